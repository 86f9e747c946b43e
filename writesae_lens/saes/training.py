"""Training-side machinery shared by the WriteSAE training classes.

SAELens' `SAETrainer` has no post-optimizer-step callback for the SAE. The work the paper does
after optimizer steps therefore runs at the start of `training_forward_pass` (the place SAELens'
own JumpReLU SAE projects its threshold), on `.data` and outside the autograd graph:

* the decoder bias is set to the mean of the first training batch (`b_dec_init="mean"`);
* decoder factor rows are rescaled to unit norm every `decoder_renorm_every` steps, which is the
  paper's "after the optimizer step" renorm shifted by one step (identical when it is 1);
* optionally, dead latents are re-seeded from the batch (`resample_dead_every`).
"""

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import calculate_topk_aux_acts
from torch import Tensor

from writesae_lens.saes import factored, resampling
from writesae_lens.saes.base import WriteSAEBase, _save_atomically


def runner_of_this_training() -> Any:
    """The SAELens `LanguageModelSAETrainingRunner` whose `run()` is on the call stack, if any."""
    from sae_lens import LanguageModelSAETrainingRunner

    from writesae_lens.saes.call_stack import running_frame

    frame = running_frame(LanguageModelSAETrainingRunner.run.__code__, 40)
    return None if frame is None else frame.f_locals.get("self")


def check_runner_output_free(runner: Any) -> None:
    """Refuse, before the first training step, a runner `output_path` that already holds files.

    The runner saves the final SAE there at the end; WriteSAEs never overwrite a folder the user
    named, so without this check a repeated run would train to the end and only then fail.
    """
    output = getattr(runner.cfg, "output_path", None)
    if output is None:
        return
    folder = Path(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"The runner's output_path {folder} already holds files, and a WriteSAE is never saved over "
            "an existing SAE. Choose a new or empty output_path, or remove that folder, before training "
            "(checked before the first step, so no training was lost)."
        )


def record_model_class(sae: Any, model: Any) -> None:
    """Name the hooked model's own class in the SAE's metadata.

    SAELens' runner records its config's `model_class_name` ("HookedTransformer") and TransformerLens
    `from_pretrained` kwargs, which describe a model the SAE was not trained on; loading such an SAE then
    advises HookedSAETransformer. For models that are not TransformerLens' own, record the real class
    and no TransformerLens kwargs.
    """
    from transformer_lens import HookedTransformer

    metadata = sae.cfg.metadata
    if model is None or isinstance(model, HookedTransformer) or metadata is None:
        return
    metadata.model_class_name = type(model).__name__
    metadata.model_from_pretrained_kwargs = {}


class WriteTrainingSAEBase(WriteSAEBase):
    """Adds pre-step upkeep, the dead-latent auxiliary loss and resampling to `WriteSAEBase`."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._b_dec_awaits_mean_init = self.cfg.b_dec_init == "mean"

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Loaded weights already carry a trained decoder bias: skip the first-batch mean init."""
        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]
        self._b_dec_awaits_mean_init = False

    # ---- upkeep between optimizer steps -------------------------------------------------------

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._upkeep_before_step(step_input)
        return super().training_forward_pass(step_input)  # type: ignore[misc]

    @torch.no_grad()
    def _upkeep_before_step(self, step_input: TrainStepInput) -> None:
        step = step_input.n_training_steps
        if not getattr(self, "_runner_checked", False):
            self._runner_checked = True
            runner = runner_of_this_training()
            if runner is not None:
                check_runner_output_free(runner)
                record_model_class(self, runner.model)
        if self._b_dec_awaits_mean_init:
            self._check_states(step_input.sae_in)
            self.initialize_b_dec_to_mean_(step_input.sae_in)
        every = self.cfg.decoder_renorm_every
        if every > 0 and step % every == 0:
            self.renormalize_decoder_factors_()
        every = self.cfg.resample_dead_every
        dead = step_input.dead_neuron_mask
        if every > 0 and step > 0 and step % every == 0 and dead is not None and bool(dead.any()):
            self.resample_dead_atoms_(step_input.sae_in, dead)

    @torch.no_grad()
    def initialize_b_dec_to_mean_(self, states: Float[Tensor, "n d_in"]) -> None:
        """Set the decoder bias to the mean of `states` (what the SAE sees, after any scaling)."""
        self.b_dec.data.copy_(states.to(self.b_dec.dtype).mean(dim=0))
        self._b_dec_awaits_mean_init = False

    @torch.no_grad()
    def renormalize_decoder_factors_(self) -> None:
        """Rescale every key-side and every value-side decoder factor row to unit L2 norm."""
        factored.normalize_factor_rows_(self.W_dec_key.data)
        factored.normalize_factor_rows_(self.W_dec_value.data)

    # ---- dead-latent auxiliary loss (TopK family) ---------------------------------------------

    def topk_aux_loss(
        self,
        sae_in: Float[Tensor, "n d_in"],
        sae_out: Float[Tensor, "n d_in"],
        hidden_pre: Float[Tensor, "n d_sae"],
        dead_neuron_mask: Bool[Tensor, " d_sae"] | None,
    ) -> Float[Tensor, ""]:
        """SAELens' TopK auxiliary loss with the factored decoder.

        The k_aux most active dead latents reconstruct the residual the live ones left (decoder
        bias excluded); k_aux = cfg.aux_k, or d_in // 2 as in SAELens when unset, and the loss
        is scaled down by min(n_dead / k_aux, 1). Zero when nothing is dead.
        """
        if dead_neuron_mask is None or (n_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = (sae_in - sae_out).detach()
        k_aux = self.cfg.aux_k if self.cfg.aux_k is not None else self.cfg.d_in // 2
        scale = min(n_dead / k_aux, 1.0)
        aux_code = calculate_topk_aux_acts(
            k_aux=min(k_aux, n_dead), hidden_pre=hidden_pre, dead_neuron_mask=dead_neuron_mask
        )
        aux_recon = self.decode_without_bias(aux_code)
        aux_loss = (aux_recon - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * aux_loss

    # ---- dead-atom resampling (paper 2.1) ----------------------------------------------------

    @torch.no_grad()
    def resample_dead_atoms_(
        self,
        states: Float[Tensor, "n d_in"],
        dead_mask: Bool[Tensor, " d_sae"],
        optimizer: torch.optim.Optimizer | None = None,
        generator: torch.Generator | None = None,
    ) -> Int[Tensor, " n_resampled"]:
        """Re-seed dead latents from badly reconstructed states; returns their indices.

        Draws min(n_dead, n) states with replacement, proportional to squared reconstruction
        error, and gives the first dead latents (ascending) the top singular vectors of those
        states as the encoder sees them (minus b_dec when apply_b_dec_to_input; raw otherwise,
        as in the paper) as decoder factors. The encoder filter gets the same directions with
        Frobenius norm 0.2 x the mean norm of the alive filters (key-side encoder factor scaled,
        value-side unit); b_enc = 0.
        Tied SAEs only set the decoder. If `optimizer` is given, the Adam moments of the touched
        slices are zeroed.
        """
        self._check_states(states)
        dead_indices = torch.nonzero(dead_mask, as_tuple=False).flatten()
        n_new = min(int(dead_indices.numel()), states.shape[0])
        if n_new == 0:
            return dead_indices[:0]
        targets = dead_indices[:n_new]
        states = states.to(self.b_dec.dtype)
        squared_errors = (self(states) - states).pow(2).sum(dim=-1)
        drawn = states[resampling.draw_states_by_error(squared_errors, n_new, generator)]
        if self.cfg.apply_b_dec_to_input:  # seed from the state as the encoder sees it
            drawn = drawn - self.b_dec
        key_new, value_new = resampling.leading_singular_factors(
            factored.states_as_matrices(drawn, self.cfg.d_k, self.cfg.d_v), self.cfg.rank
        )
        alive = ~dead_mask
        self.W_dec_key.data[targets] = key_new
        self.W_dec_value.data[targets] = value_new
        if self.cfg.encoder_kind == "dense":
            new_norm = resampling.resampled_encoder_norm(self.W_enc_dense.norm(dim=0)[alive])
            directions = drawn / drawn.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            self.W_enc_dense.data[:, targets] = (new_norm * directions).T
        elif not self.cfg.tied:
            alive_norms = factored.atom_frobenius_norms(self.W_enc_key, self.W_enc_value)[alive]
            new_norm = resampling.resampled_encoder_norm(alive_norms)
            filter_norms = factored.atom_frobenius_norms(key_new, value_new).clamp(min=1e-12)
            self.W_enc_key.data[targets] = key_new * (new_norm / filter_norms)[:, None, None]
            self.W_enc_value.data[targets] = value_new
        self.b_enc.data[targets] = 0.0
        self._reset_extra_state_of_resampled(targets, alive)
        if optimizer is not None:
            self._zero_adam_moments(optimizer, targets)
        return targets

    def _reset_extra_state_of_resampled(
        self, targets: Int[Tensor, " n_resampled"], alive: Bool[Tensor, " d_sae"]
    ) -> None:
        """Architecture-specific per-latent state to reset on resampling (e.g. thresholds)."""

    def _zero_adam_moments(
        self, optimizer: torch.optim.Optimizer, targets: Int[Tensor, " n_resampled"]
    ) -> None:
        """Zero Adam's exp_avg / exp_avg_sq on the resampled latents' slices of every parameter."""
        for name, param in self.named_parameters():
            if name == "b_dec":  # no latent axis
                continue
            latent_axis = 1 if name == "W_enc_dense" else 0  # W_enc_dense is [d_in, d_sae]
            state = optimizer.state.get(param, {})
            for moment_name in ("exp_avg", "exp_avg_sq"):
                moment = state.get(moment_name)
                if moment is not None:
                    moment.index_fill_(latent_axis, targets, 0.0)

    # ---- bookkeeping --------------------------------------------------------------------------

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        return {"weights/W_dec_norms": self.atom_norms().detach().float().cpu().numpy()}

    def save_inference_model(
        self, path: str | Path, *, overwrite: bool = False
    ) -> tuple[Path, Path]:
        """SAELens' inference save, into a folder written atomically (see `save_model`)."""
        return _save_atomically(super().save_inference_model, path, overwrite)  # type: ignore[misc]
