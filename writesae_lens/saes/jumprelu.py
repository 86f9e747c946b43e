"""JumpReLU WriteSAE: latent i is active when its pre-activation exceeds a learned threshold.

Architecture name "write_jumprelu" (inference and training registries). Also the inference form
that "write_batchtopk" SAEs are saved as. Training reuses SAELens' JumpReLU and Step
straight-through estimators with a rectangle kernel (the paper's JumpReLU uses the same
estimators on log(threshold); here, as in SAELens, the threshold itself is the parameter and is
kept non-negative by projection).
"""

from dataclasses import dataclass
from typing import Any, no_type_check

import torch
from jaxtyping import Float, Int
from sae_lens.saes.jumprelu_sae import JumpReLU, Step, calculate_pre_act_loss
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import Tensor, nn

from writesae_lens.saes.base import WriteSAEBase
from writesae_lens.saes.config_fields import WriteSAEShapeFields, WriteTrainingFields
from writesae_lens.saes.training import WriteTrainingSAEBase


def _add_threshold(sae: WriteSAEBase, initial_value: float) -> None:
    sae.threshold = nn.Parameter(
        torch.full((sae.cfg.d_sae,), initial_value, dtype=sae.dtype, device=sae.device)
    )


@torch.no_grad()
def _fold_decoder_norms_with_threshold(sae: Any) -> None:
    norms = sae.fold_and_get_W_dec_norm()  # scales b_enc and the encoder rows by the norms
    sae.threshold.data.mul_(norms)


@no_type_check  # SAELens builds configs with a dict metadata; see config_fields.py
@dataclass
class WriteJumpReLUSAEConfig(WriteSAEShapeFields, SAEConfig):
    """Inference config (the shared WriteSAE fields only)."""

    @classmethod
    def architecture(cls) -> str:
        return "write_jumprelu"


class WriteJumpReLUSAE(WriteSAEBase, SAE[WriteJumpReLUSAEConfig]):
    """Inference JumpReLU WriteSAE: a_i = relu(z_i) * [z_i > threshold_i]."""

    threshold: nn.Parameter

    def __init__(self, cfg: WriteJumpReLUSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        _add_threshold(self, 0.0)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        hidden_pre = self._hidden_pre(x)  # [..., d_sae]
        above = (hidden_pre > self.threshold).to(hidden_pre.dtype)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre) * above)

    def fold_W_dec_norm(self) -> None:
        _fold_decoder_norms_with_threshold(self)


@no_type_check  # SAELens builds configs with a dict metadata; see config_fields.py
@dataclass
class WriteJumpReLUTrainingSAEConfig(WriteTrainingFields, TrainingSAEConfig):
    """Training config (L = MSE + l0_coefficient * mean_batch sum_i H(z_i - threshold_i)).

    Args:
        jumprelu_init_threshold: initial threshold (paper run: 1e-4; code default 1e-3).
        jumprelu_bandwidth: width of the straight-through rectangle kernel (paper: 1e-3).
        jumprelu_ste_to_input: also pass the L0 estimator's gradient to the pre-activations
            (SAELens option; False = gradient to the threshold only, as in the paper).
        l0_coefficient: weight of the L0 penalty (paper run: 1e-5; code default 1e-3).
        l0_warm_up_steps: linear warm-up of that weight (SAELens coefficient schedule).
        jumprelu_sparsity_loss_mode: SAELens' sparsity penalties: "step" (the L0 count through
            the straight-through Step, the paper's), "tanh" (sum_i tanh(c * a_i * ||A_i||_F),
            c = jumprelu_tanh_scale) or "quadratic" (2 / target_l0 * (L0 - target_l0)^2).
        jumprelu_tanh_scale: c of the tanh penalty (SAELens default 4).
        target_l0: the L0 the quadratic penalty pulls towards (required for "quadratic").
        pre_act_loss_coefficient: SAELens' pre-activation loss on dead latents,
            coefficient * mean_batch sum_i relu(theta_i - z_i) * dead_i * ||A_i||_F; None = off.
    """

    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    jumprelu_ste_to_input: bool = False
    l0_coefficient: float = 1e-3
    l0_warm_up_steps: int = 0
    jumprelu_sparsity_loss_mode: str = "step"
    jumprelu_tanh_scale: float = 4.0
    target_l0: float | None = None
    pre_act_loss_coefficient: float | None = None

    def __post_init__(self) -> None:
        _validate_sparsity_loss(self)
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "write_jumprelu"


SPARSITY_LOSS_MODES = ("step", "tanh", "quadratic")


def _validate_sparsity_loss(cfg: Any) -> None:
    mode = cfg.jumprelu_sparsity_loss_mode
    if mode not in SPARSITY_LOSS_MODES:
        raise ValueError(
            f"WriteSAE config: jumprelu_sparsity_loss_mode must be one of {SPARSITY_LOSS_MODES}, "
            f"got {mode!r}."
        )
    if not (isinstance(cfg.jumprelu_bandwidth, (int, float)) and cfg.jumprelu_bandwidth > 0):
        raise ValueError(
            f"WriteSAE config: jumprelu_bandwidth must be a positive number, got {cfg.jumprelu_bandwidth!r}."
        )
    if mode == "quadratic" and (cfg.target_l0 is None or not 0 < cfg.target_l0 <= cfg.d_sae):
        raise ValueError(
            "WriteSAE config: jumprelu_sparsity_loss_mode='quadratic' needs target_l0 with "
            f"0 < target_l0 <= d_sae = {cfg.d_sae}, got {cfg.target_l0!r}."
        )


class WriteJumpReLUTrainingSAE(WriteTrainingSAEBase, TrainingSAE[WriteJumpReLUTrainingSAEConfig]):
    """JumpReLU WriteSAE for training with the straight-through L0 penalty."""

    threshold: nn.Parameter

    def __init__(self, cfg: WriteJumpReLUTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.bandwidth = cfg.jumprelu_bandwidth  # SAELens' attribute name

    def initialize_weights(self) -> None:
        super().initialize_weights()
        _add_threshold(self, self.cfg.jumprelu_init_threshold)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        return super().training_forward_pass(step_input)

    def encode_with_hidden_pre(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        hidden_pre = self._hidden_pre(x)  # [..., d_sae]
        feature_acts = JumpReLU.apply(
            hidden_pre, self.threshold, self.cfg.jumprelu_bandwidth, self.cfg.jumprelu_ste_to_input
        )
        return self.hook_sae_acts_post(feature_acts), hidden_pre

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """The sparsity penalty of cfg.jumprelu_sparsity_loss_mode (and the pre-activation loss)."""
        cfg = self.cfg
        mode = cfg.jumprelu_sparsity_loss_mode
        if mode == "tanh":
            scaled = cfg.jumprelu_tanh_scale * feature_acts * self.atom_norms()
            per_state = torch.tanh(scaled).sum(dim=-1)  # [n]
        else:
            per_state = Step.apply(  # the number of active latents, [n]
                hidden_pre, self.threshold, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input
            ).sum(dim=-1)
            if mode == "quadratic":
                per_state = 2 / cfg.target_l0 * (per_state - cfg.target_l0) ** 2
        losses = {"l0_loss": (step_input.coefficients["l0"] * per_state).mean()}
        if cfg.pre_act_loss_coefficient is not None:
            losses["pre_act_loss"] = calculate_pre_act_loss(
                cfg.pre_act_loss_coefficient, self.threshold, hidden_pre,
                step_input.dead_neuron_mask, self.atom_norms(),
            )
        return losses

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "l0": TrainCoefficientConfig(
                value=self.cfg.l0_coefficient, warm_up_steps=self.cfg.l0_warm_up_steps
            )
        }

    def fold_W_dec_norm(self) -> None:
        _fold_decoder_norms_with_threshold(self)

    def _reset_extra_state_of_resampled(
        self, targets: Int[Tensor, " n_resampled"], alive: torch.Tensor
    ) -> None:
        """Resampled latents start at the mean threshold of the alive ones."""
        alive_thresholds = self.threshold.data[alive]
        if alive_thresholds.numel() > 0:
            self.threshold.data[targets] = alive_thresholds.mean()

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Accept the paper's log-threshold parameterisation."""
        super().process_state_dict_for_loading(state_dict)
        if "log_threshold" in state_dict:
            state_dict["threshold"] = state_dict.pop("log_threshold").exp().contiguous()
