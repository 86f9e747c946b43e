"""Shared helpers of the per-family edit tests: run an edited forward and compare it with the naive reference."""

from __future__ import annotations

import torch

from naive_recurrence import naive_edited_layer
from writesae_lens.ops.state_edits import StateEdits

FACTORS = ("hook_read_q", "hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay")


def state_edits(matrices: dict, **flags) -> StateEdits:
    """The ``StateEdits`` of ``{(batch, pos, head): [d_k, d_v]}`` (flags as ``StateEdits.build``: after_read, assign)."""
    index = torch.tensor(list(matrices)).T
    return StateEdits.build(index[0], index[1], index[2], torch.stack(list(matrices.values())), **flags)


def assert_close(ours, ref, tol=1e-5):
    ref = ref.to(ours.dtype)
    err = (ours - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err.item() <= tol, f"relative error {err.item():.2e}"


class EditChecks:
    """For one recurrent layer of a family (``delta_rule``: whether its transition erases along the key)."""

    def __init__(self, layer: int, delta_rule: bool) -> None:
        self.layer, self.delta_rule = layer, delta_rule

    def mixer(self, name: str) -> str:
        return f"blocks.{self.layer}.mixer.{name}"

    def run_edited(self, model, tokens, hooks):
        """Logits, reads and final state of the layer in an edited run."""
        cache = model.empty_cache()
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits, acts = model.run_with_cache(tokens, names_filter=[self.mixer("hook_read")], cache=cache)
        return logits, acts[self.mixer("hook_read")], cache.recurrent_state(self.layer)

    def naive(self, native, **edits):
        return naive_edited_layer(*(native[n] for n in FACTORS), delta_rule=self.delta_rule, **edits)

    def expected(self, model, tokens, native, **edits):
        """The naive reference's reads and final state, and the logits of a run whose only change is those reads."""
        reads, final, _ = self.naive(native, **edits)
        reads32 = reads.float()
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(self.mixer("hook_read"), lambda x, hook: reads32)])
        return logits, reads, final

    def check(self, model, tokens, native, hooks, **edits):
        logits, reads, final = self.run_edited(model, tokens, hooks)
        ref_logits, ref_reads, ref_final = self.expected(model, tokens, native, **edits)
        assert_close(reads, ref_reads)
        assert_close(final, ref_final)
        assert_close(logits, ref_logits, tol=1e-4)
        return logits
