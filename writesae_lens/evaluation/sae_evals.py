"""SAELens-style evaluation of an SAE trained on one head of ``blocks.{l}.mixer.hook_state``.

SAELens' own ``run_evals`` splices a reconstruction back per head only for hook names containing ``hook_q``,
``hook_k``, ``hook_v`` or ``hook_z``; for ``hook_state`` it would pass all heads through the one-head SAE and fail on
a shape mismatch. This module computes the same metrics with a head-aware splice:

- ``explained_variance``, ``mse``, ``l0`` on the head's states (every position);
- ``ce_loss_clean``, ``ce_loss_spliced`` (the head's states replaced by their reconstructions at every position, which
  under the library's edit semantics means "every read of that head sees the reconstruction"),
  ``ce_loss_zero`` (the head's states replaced by zeros), ``ce_loss_score`` = (zero - spliced) / (zero - clean), and
  ``kl_div_spliced`` / ``kl_div_zero`` = KL(clean || edited) per token.

SAELens' own ``sae_lens.evals.run_evals`` (and with it the training runner's evals) is made to work on such SAEs by
``install_sae_lens_state_splice``, which ``import writesae_lens.saes`` runs: SAELens' reconstruction-loss step is
wrapped so that, for a hook named ``*.hook_state`` with ``hook_head_index`` set, it replaces / zero-ablates that one
head (``state_head_recons_loss``); every other SAE and hook goes to SAELens' own code unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def sae_cell(sae) -> tuple[str, int]:
    """The (hook name, head) an SAE was trained on, from its SAELens metadata; a clear error when absent."""
    metadata = getattr(sae.cfg, "metadata", None)
    hook_name, head = getattr(metadata, "hook_name", None), getattr(metadata, "hook_head_index", None)
    if hook_name is None or head is None or not hook_name.endswith("mixer.hook_state"):
        raise ValueError(
            "this SAE's metadata does not name a recurrent-state hook and head "
            f"(hook_name={hook_name!r}, hook_head_index={head!r}); expected 'blocks.{{l}}.mixer.hook_state' and a head"
        )
    return hook_name, int(head)


@torch.no_grad()
def evaluate_state_sae(model, sae, tokens: Tensor, batch_size: int = 8) -> dict[str, float]:
    """The metrics above, averaged over ``tokens`` ``[n, pos]`` (next-token losses over every position but the last)."""
    hook_name, head = sae_cell(sae)
    if hook_name not in model.hook_dict:
        raise ValueError(f"the SAE's hook {hook_name!r} is not a hook of this model")
    totals: dict[str, float] = {}
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        metrics = _batch_metrics(model, sae, batch, hook_name, head)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value * batch.shape[0]
        count += batch.shape[0]
    out = {name: value / count for name, value in totals.items()}
    recovered = out["ce_loss_zero"] - out["ce_loss_clean"]
    out["ce_loss_score"] = (out["ce_loss_zero"] - out["ce_loss_spliced"]) / recovered if recovered else float("nan")
    return out


def _batch_metrics(model, sae, tokens: Tensor, hook_name: str, head: int) -> dict[str, float]:
    clean_logits, cache = model.run_with_cache(tokens, names_filter=hook_name)
    states = cache[hook_name][:, :, head]  # [batch, pos, d_k * d_v]
    codes = sae.encode(states.to(sae.device, sae.dtype))
    recon = sae.decode(codes).to(states)
    residual = (states - recon).pow(2).sum(-1)
    variance = (states - states.mean((0, 1), keepdim=True)).pow(2).sum(-1)

    def replace_head(new_head_states: Tensor):
        def hook(x: Tensor, hook) -> Tensor:
            out = x.clone()
            out[:, :, head] = new_head_states
            return out

        return [(hook_name, hook)]

    spliced = model.run_with_hooks(tokens, fwd_hooks=replace_head(recon))
    zeroed = model.run_with_hooks(tokens, fwd_hooks=replace_head(torch.zeros_like(states)))
    return {
        "explained_variance": float(1 - residual.sum() / variance.sum()),
        "mse": float(residual.mean() / states.shape[-1]),
        "l0": float((codes > 0).sum(-1).float().mean()),
        "ce_loss_clean": _next_token_loss(clean_logits, tokens),
        "ce_loss_spliced": _next_token_loss(spliced, tokens),
        "ce_loss_zero": _next_token_loss(zeroed, tokens),
        "kl_div_spliced": _kl(clean_logits, spliced),
        "kl_div_zero": _kl(clean_logits, zeroed),
    }


def _next_token_loss(logits: Tensor, tokens: Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()))


def _kl(reference: Tensor, edited: Tensor) -> float:
    p = F.log_softmax(reference.float(), -1)
    q = F.log_softmax(edited.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ---- SAELens' run_evals on hook_state SAEs ----------------------------------------------------------------------


def is_state_head_sae(sae, hook_name: str | None) -> bool:
    """True for an SAE of one head of a ``hook_state`` hook (whose activations are [batch, pos, head, d_in])."""
    head = getattr(getattr(sae.cfg, "metadata", None), "hook_head_index", None)
    return hook_name is not None and hook_name.endswith("hook_state") and head is not None


@torch.no_grad()
def state_head_recons_loss(sae, model, activation_scaler, batch_tokens: Tensor, compute_kl: bool,
                           compute_ce_loss: bool, ignore_tokens: list[int] | None = None,
                           model_kwargs: Mapping[str, Any] = {}, hook_name: str | None = None) -> dict[str, Any]:
    """SAELens' ``get_recons_loss`` contract (same arguments, same metric names, per-token losses) for one head of
    ``hook_state``: the head's states go through the SAE (scaled and unscaled by ``activation_scaler`` as SAELens
    does), the other heads are left alone; the ablation zeroes that head only; ignored tokens keep their states."""
    hook_name = hook_name or sae.cfg.metadata.hook_name
    head = int(sae.cfg.metadata.hook_head_index)
    clean_logits, clean_loss = model(batch_tokens, return_type="both", loss_per_token=True, **model_kwargs)
    keep = torch.ones_like(batch_tokens, dtype=torch.bool)
    for token in ignore_tokens or []:
        keep &= batch_tokens != token

    def spliced(states: Tensor, hook) -> Tensor:  # states [batch, pos, head, d_in]
        head_states = states[:, :, head].to(sae.device)
        recon = activation_scaler.unscale(sae.decode(sae.encode(activation_scaler.scale(head_states))))
        recon = torch.where(keep.to(recon.device)[..., None], recon.to(head_states.dtype), head_states)
        out = states.clone()
        out[:, :, head] = recon.to(states.device)
        return out

    def ablated(states: Tensor, hook) -> Tensor:
        out = states.clone()
        out[:, :, head] = 0
        return out

    def run(hook) -> tuple[Tensor, Tensor]:
        return model.run_with_hooks(batch_tokens, return_type="both", fwd_hooks=[(hook_name, hook)],
                                    loss_per_token=True, **model_kwargs)

    recons_logits, recons_loss = run(spliced)
    ablated_logits, ablated_loss = run(ablated)
    metrics: dict[str, Any] = {}
    if compute_kl:
        metrics["kl_div_with_sae"] = _kl_per_token(clean_logits, recons_logits)
        metrics["kl_div_with_ablation"] = _kl_per_token(clean_logits, ablated_logits)
    if compute_ce_loss:
        metrics["ce_loss_with_sae"] = recons_loss
        metrics["ce_loss_without_sae"] = clean_loss
        metrics["ce_loss_with_ablation"] = ablated_loss
    return metrics


def _kl_per_token(reference: Tensor, edited: Tensor) -> Tensor:
    """KL(reference || edited) per position, [batch, pos] (the shape SAELens' evals average)."""
    p = F.log_softmax(reference.float(), -1)
    q = F.log_softmax(edited.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def install_sae_lens_state_splice() -> None:
    """Route SAELens' reconstruction-loss eval to ``state_head_recons_loss`` for one-head ``hook_state`` SAEs.

    SAELens' ``get_recons_loss`` splices one head only for hook names containing hook_q/k/v/z and otherwise feeds the
    whole activation through the SAE, which on a [batch, pos, head, d_in] state fails with a shape error. The
    wrapper leaves every other SAE and hook to SAELens; installing twice is harmless."""
    import sae_lens.evals as sae_lens_evals

    original = sae_lens_evals.get_recons_loss
    if getattr(original, "_writesae_state_splice", False):
        return

    @functools.wraps(original)
    def get_recons_loss(sae, model, activation_scaler, batch_tokens, compute_kl, compute_ce_loss,
                        ignore_tokens=None, model_kwargs={}, hook_name=None):
        if is_state_head_sae(sae, hook_name or sae.cfg.metadata.hook_name):
            return state_head_recons_loss(sae, model, activation_scaler, batch_tokens, compute_kl, compute_ce_loss,
                                          ignore_tokens, model_kwargs, hook_name)
        return original(sae, model, activation_scaler, batch_tokens, compute_kl, compute_ce_loss,
                        ignore_tokens, model_kwargs, hook_name)

    get_recons_loss._writesae_state_splice = True  # type: ignore[attr-defined]
    sae_lens_evals.get_recons_loss = get_recons_loss
