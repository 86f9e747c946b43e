"""Mamba-2 only: write edits leave the skip term ``D x`` alone (the shared edit checks run in
``test_write_edits.py``)."""

import torch

LAYER = 1


def test_write_edits_leave_the_skip_term(mamba2_pair):
    """dt := 0 and a new x at some cells, written in place: the skip term still sees the model's own x."""
    model = mamba2_pair[1]
    tokens = torch.randint(0, 100, (2, 83), generator=torch.Generator().manual_seed(11))
    skip = f"blocks.{LAYER}.mixer.hook_skip"
    cells = [(0, 5, 1), (1, 64, 0), (0, 82, 3)]

    def set_v(x, hook):
        for b, t, h in cells:
            x[b, t, h] = 1.0
        return x

    def set_beta(x, hook):
        for b, t, h in cells:
            x[b, t, h] = 0.0

    with torch.no_grad():
        native_logits, native = model.run_with_cache(tokens, names_filter=[skip])
        hooks = [(f"blocks.{LAYER}.mixer.hook_write_v", set_v), (f"blocks.{LAYER}.mixer.hook_write_beta", set_beta)]
        with model.hooks(fwd_hooks=hooks):
            edited_logits, edited = model.run_with_cache(tokens, names_filter=[skip])
    assert not torch.allclose(edited_logits, native_logits)
    assert torch.equal(edited[skip], native[skip])
