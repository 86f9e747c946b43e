"""TopK WriteSAE: keep the k largest pre-activations of each state (ReLU'd), decode sparsely.

Architecture name "write_topk" (inference and training registries).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import no_type_check

from jaxtyping import Float
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import TopK
from torch import Tensor

from writesae_lens.saes.base import WriteSAEBase
from writesae_lens.saes.config_fields import WriteSAEShapeFields, WriteTrainingFields
from writesae_lens.saes.training import WriteTrainingSAEBase

DEFAULT_K = 32  # the paper's k


@no_type_check  # SAELens builds configs with a dict metadata; see config_fields.py
@dataclass
class WriteTopKSAEConfig(WriteSAEShapeFields, SAEConfig):
    """Inference config. Adds k (active latents per state) to the shared WriteSAE fields."""

    k: int = DEFAULT_K

    @classmethod
    def architecture(cls) -> str:
        return "write_topk"


class WriteTopKSAE(WriteSAEBase, SAE[WriteTopKSAEConfig]):
    """Inference TopK WriteSAE. encode: [..., d_in] -> [..., d_sae]; decode: back to [..., d_in]."""

    def __init__(self, cfg: WriteTopKSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return TopK(self.cfg.k)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        hidden_pre = self._hidden_pre(x)  # [..., d_sae]
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre))

    def fold_W_dec_norm(self) -> None:
        _refuse_decoder_norm_fold()


@no_type_check  # SAELens builds configs with a dict metadata; see config_fields.py
@dataclass
class WriteTopKTrainingSAEConfig(WriteTrainingFields, TrainingSAEConfig):
    """Training config.

    Args:
        k: active latents per state (paper: 32).
        aux_k: dead latents used by the auxiliary loss; None = SAELens' d_in // 2 (paper: 256).
        aux_loss_coefficient: weight of the auxiliary loss (SAELens and the paper's code: 1.0).
        use_sparse_activations: SAELens option: the TopK activation returns a sparse COO code
            (decoding densifies it and gathers the active atoms either way).
    """

    k: int = DEFAULT_K
    aux_k: int | None = None
    aux_loss_coefficient: float = 1.0
    use_sparse_activations: bool = False

    @classmethod
    def architecture(cls) -> str:
        return "write_topk"


class WriteTopKTrainingSAE(WriteTrainingSAEBase, TrainingSAE[WriteTopKTrainingSAEConfig]):
    """TopK WriteSAE for training: MSE + SAELens' dead-latent auxiliary loss."""

    def __init__(self, cfg: WriteTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return TopK(self.cfg.k, use_sparse_activations=self.cfg.use_sparse_activations)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # the codes decoded in a training step come out of a TopK selection, whose backward reads
        # the code's gradient on the selected entries only: form it there alone (exact, cheaper)
        self._active_code_gradient_only = True
        try:
            return super().training_forward_pass(step_input)
        finally:
            self._active_code_gradient_only = False

    def calculate_topk_aux_loss(
        self,
        sae_in: Tensor,
        sae_out: Tensor,
        hidden_pre: Tensor,
        dead_neuron_mask: Tensor | None,
    ) -> Tensor:
        """SAELens' name for the dead-latent auxiliary loss (see `topk_aux_loss`)."""
        return self.topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)

    def encode_with_hidden_pre(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        hidden_pre = self._hidden_pre(x)  # [..., d_sae]
        feature_acts = self.hook_sae_acts_post(self.activation_fn(hidden_pre))
        return feature_acts, hidden_pre

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        aux_loss = self.topk_aux_loss(
            step_input.sae_in, sae_out, hidden_pre, step_input.dead_neuron_mask
        )
        return {"auxiliary_reconstruction_loss": aux_loss}

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def fold_W_dec_norm(self) -> None:
        _refuse_decoder_norm_fold()


def _refuse_decoder_norm_fold() -> None:
    raise NotImplementedError(
        "Folding decoder norms into a TopK-family WriteSAE would change which latents win the "
        "top-k; its atoms are kept at unit-norm factors during training instead."
    )
