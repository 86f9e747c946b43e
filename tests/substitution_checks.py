"""Checking substitution-test records against the hook path: each firing's edit applied alone to its whole passage
through ``interventions.add_to_state`` (one batch row per edit), the KLs read where the record says."""

from __future__ import annotations

import torch

from writesae_lens import interventions as iv
from writesae_lens.evaluation.substitution import head_states


def hook_path_kls(model, layer, tokens, cells, matrices, timing, reads):
    """[(KL(native || edited), KL(edited || native))] at ``reads[i]`` for edit i alone."""
    with torch.no_grad():
        native = torch.log_softmax(model(tokens).double(), -1)
        rows = [(i, t, h) for i, (_, t, h) in enumerate(cells)]
        edited = model.run_with_hooks(tokens[[p for p, _, _ in cells]],
                                      fwd_hooks=iv.add_to_state(layer, rows, matrices, timing))
        edited = torch.log_softmax(edited.double(), -1)
    out = []
    for i, (p, _, _) in enumerate(cells):
        n, e = native[p, reads[i]], edited[i, reads[i]]
        out.append((float((n.exp() * (n - e)).sum()), float((e.exp() * (e - n)).sum())))
    return out


def assert_records_match_hook_path(model, sae, layer, head, tokens, records, timing, kl_at, tol=1e-5) -> int:
    """Every record's atom, coefficient, native norm and atom / delete KLs (both directions) equal the hook path's;
    returns the number of edits checked."""
    states, factors = head_states(model, tokens, layer, head)
    d_sae = sae.cfg.d_sae
    atoms = iv.atom_matrices(sae, torch.arange(d_sae), d_sae)
    cells, matrices, reads, expected = [], [], [], []
    for row in records.drop_duplicates(["passage", "position"]).itertuples():
        p, t = row.passage, row.position
        native = factors["beta"][p, t] * torch.outer(factors["k"][p, t], factors["v"][p, t])
        code = sae.encode(states[p, t]).detach()
        assert int(code.argmax()) == row.atom  # the code up to fp32 rounding of a differently batched encode:
        assert abs(float(code.max()) - row.coefficient) <= 1e-6 * max(1.0, row.coefficient)
        assert abs(float(native.norm()) - row.native_write_norm) < 1e-5
        read = (t + 1 if timing == "after_read" else t) if kl_at == "next" else tokens.shape[1] - 1
        for condition, matrix in (("atom", row.coefficient * atoms[row.atom] - native), ("delete", -native)):
            cells.append((p, t, head))
            matrices.append(matrix)
            reads.append(read)
            expected.append((getattr(row, f"kl_{condition}"), getattr(row, f"kl_{condition}_rev")))
    got = hook_path_kls(model, layer, tokens, cells, torch.stack(matrices).detach(), timing, reads)
    worst = max(max(abs(a - c), abs(b - d)) for (a, b), (c, d) in zip(got, expected))
    assert worst <= tol, worst
    assert (records.kl_delete > -1e-6).all() and (records.kl_random > -1e-6).all()  # KLs, up to rounding
    return len(cells)
