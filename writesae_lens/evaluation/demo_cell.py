"""The demo's cell: the memory report proposes, the trained SAE's firing density confirms.

``choose_demo_cell`` ranks the heads by how long their writes last (among those whose memory matters and whose write
is not negligible). A cell can still be a poor demo when the WriteSAE trained on it nearly collapses: if few of its
features fire on the test passages, the substitution test exercises a handful of atoms. ``train_on_a_live_cell``
trains on the proposed cell, measures the share of the dictionary that fires on the test passages (``live_share``)
and, below ``min_live_share``, moves on to the next cell the report proposes, up to ``max_cells`` cells; it keeps the
cell with the largest share if none reaches it. The reason it returns says what was tried and why.

The density used is the share of features that fire at least once on the test passages, not the per-token firing
rate: a TopK SAE fires k features at every position, so that rate is k / d_sae on every cell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .memory import MemoryReport, choose_demo_cell


def train_on_a_live_cell(report: MemoryReport, train: Callable[[int, int], Any],
                         live_share: Callable[[Any, int, int], float], *, min_live_share: float = 0.1,
                         max_cells: int = 3, log: Callable[[str], None] = print) -> tuple[int, int, Any, str]:
    """(layer, head, sae, reason): ``train(layer, head)`` returns an SAE for a cell, ``live_share(sae, layer, head)``
    the share of its features that fire on the test passages, in [0, 1]. Cells are taken in the order
    ``choose_demo_cell`` proposes them; ``log`` receives one line per cell that is passed over."""
    if not 0.0 <= min_live_share <= 1.0:
        raise ValueError(f"min_live_share must be in [0, 1], got {min_live_share!r}")
    if max_cells < 1:
        raise ValueError(f"max_cells must be at least 1, got {max_cells!r}")
    tried: dict[tuple[int, int], tuple[float, Any, str]] = {}
    for _ in range(max_cells):
        try:
            layer, head, reason = choose_demo_cell(report=report,
                                                   density=lambda l, h: 0.0 if (l, h) in tried else 1.0)
        except ValueError:  # every eligible cell has been tried
            break
        sae = train(layer, head)
        share = float(live_share(sae, layer, head))
        tried[(layer, head)] = (share, sae, reason)
        if share >= min_live_share:
            break
        log(f"      layer {layer} head {head}: only {share:.0%} of the SAE's features fire on the test passages "
            f"(under {min_live_share:.0%}); the next cell the memory report proposes")
    (layer, head), (share, sae, reason) = max(tried.items(), key=lambda item: item[1][0])
    density = f"{share:.0%} of the WriteSAE's features fire on the test passages"
    if share >= min_live_share:
        verdict = f"; {density} (at least {min_live_share:.0%})"
    else:
        verdict = (f"; {density}, the most of the {len(tried)} cells tried (none reached {min_live_share:.0%}: the "
                   "test runs on few atoms)")
    passed_over = [f"layer {l} head {h} ({s:.0%})" for (l, h), (s, _, _) in tried.items() if (l, h) != (layer, head)]
    if passed_over:
        verdict += f"; passed over for a sparse dictionary: {', '.join(passed_over)}"
    return layer, head, sae, reason + verdict
