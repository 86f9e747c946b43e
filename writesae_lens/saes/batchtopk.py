"""BatchTopK WriteSAE: keep the k * B largest ReLU'd pre-activations of a whole batch.

Training-only architecture "write_batchtopk", following SAELens' own BatchTopK: training keeps a
running threshold (an exponential moving average of the smallest active value of each batch),
and `save_inference_model` writes the SAE as a "write_jumprelu" WriteSAE whose per-latent
threshold is that running value, so inference no longer depends on the batch.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, no_type_check

import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from torch import Tensor

from writesae_lens.saes.jumprelu import WriteJumpReLUSAEConfig
from writesae_lens.saes.topk import WriteTopKTrainingSAE, WriteTopKTrainingSAEConfig


@no_type_check  # SAELens builds configs with a dict metadata; see config_fields.py
@dataclass
class WriteBatchTopKTrainingSAEConfig(WriteTopKTrainingSAEConfig):
    """Training config. k is the mean number of active latents per state over a batch.

    Args:
        k: mean active latents per state; as in SAELens it may be fractional (a batch of n
            states keeps int(k * n) latents).
        topk_threshold_lr: step of the running-threshold moving average (SAELens default 0.01).
    """

    k: float = 32
    topk_threshold_lr: float = 0.01

    @classmethod
    def architecture(cls) -> str:
        return "write_batchtopk"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return WriteJumpReLUSAEConfig


class WriteBatchTopKTrainingSAE(WriteTopKTrainingSAE):
    """BatchTopK WriteSAE for training; saves for inference as a JumpReLU WriteSAE.

    Its `encode` stays batch-relative (as in SAELens and in the paper), so it also serves as the
    exact import target for the paper's BatchTopK checkpoints.
    """

    cfg: WriteBatchTopKTrainingSAEConfig  # type: ignore[assignment]
    topk_threshold: Tensor

    def __init__(self, cfg: WriteBatchTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # float64, like SAELens, so the slow moving average does not round away
        self.register_buffer(
            "topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=self.b_enc.device)
        )

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return BatchTopK(self.cfg.k)

    def _apply(self, *args: Any, **kwargs: Any) -> "WriteBatchTopKTrainingSAE":
        """Keep the running threshold in float64 through `.to(dtype)` (loading calls it with cfg.dtype)."""
        out = super()._apply(*args, **kwargs)
        threshold = self._buffers.get("topk_threshold")
        if threshold is not None and threshold.dtype != torch.float64:
            self._buffers["topk_threshold"] = threshold.double()
        return out

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        self.update_topk_threshold_(output.feature_acts)
        output.metrics["topk_threshold"] = self.topk_threshold
        return output

    @torch.no_grad()
    def update_topk_threshold_(self, feature_acts: Tensor) -> None:
        """Move the running threshold towards this batch's smallest positive activation."""
        positive = feature_acts[feature_acts > 0]
        if positive.numel() == 0:
            return
        lr = self.cfg.topk_threshold_lr
        smallest = positive.min().to(self.topk_threshold.dtype)
        self.topk_threshold.copy_((1 - lr) * self.topk_threshold + lr * smallest)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Replace the scalar running threshold by a per-latent JumpReLU threshold.

        Folding an activation scaling factor leaves pre-activations, hence the threshold, as
        they were (see `WriteSAEBase.fold_activation_norm_scaling_factor`).
        """
        super().process_state_dict_for_saving_inference(state_dict)
        running = state_dict.pop("topk_threshold").item()
        state_dict["threshold"] = torch.full_like(self.b_enc.detach(), running)
