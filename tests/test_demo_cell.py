"""The demo's cell choice: the memory report's order, confirmed by the trained SAE's firing density."""

import pandas as pd
import pytest

from writesae_lens.evaluation.demo_cell import train_on_a_live_cell
from writesae_lens.evaluation.memory import MemoryReport, choose_demo_cell


def report_of(rows):
    """A memory report whose table holds ``rows`` of (layer, head, memory_length, kl_memory, write_share)."""
    table = pd.DataFrame(rows, columns=["layer", "head", "memory_length", "kl_memory", "write_share"])
    table["decay_q50"] = 0.9
    return MemoryReport(table=table, curves=pd.DataFrame(), settings={"threshold": 0.1, "max_lag": 128})


REPORT = [(0, 0, 40, 0.05, 0.3), (0, 1, 20, 0.05, 0.3), (1, 0, 10, 0.05, 0.3), (1, 1, 5, 0.05, 0.3)]


def run(shares, **kwargs):
    trained, logged = [], []

    def train(layer, head):
        trained.append((layer, head))
        return f"sae-{layer}-{head}"

    def live_share(sae, layer, head):
        assert sae == f"sae-{layer}-{head}"
        return shares[(layer, head)]

    layer, head, sae, reason = train_on_a_live_cell(report_of(REPORT), train, live_share, log=logged.append,
                                                    **kwargs)
    return (layer, head), sae, reason, trained, logged


def test_first_proposed_cell_is_kept_when_enough_features_fire():
    cell, sae, reason, trained, logged = run({(0, 0): 0.5})
    assert cell == (0, 0) and sae == "sae-0-0" and trained == [(0, 0)] and logged == []
    assert choose_demo_cell(report=report_of(REPORT))[2] in reason  # the memory report's reason, then the density
    assert "50% of the WriteSAE's features fire on the test passages (at least 10%)" in reason


def test_sparse_dictionaries_pass_the_cell_to_the_next_one_in_the_reports_order():
    cell, sae, reason, trained, logged = run({(0, 0): 0.02, (0, 1): 0.05, (1, 0): 0.3})
    assert trained == [(0, 0), (0, 1), (1, 0)]  # longest memory first
    assert cell == (1, 0) and sae == "sae-1-0"
    assert len(logged) == 2 and "layer 0 head 0: only 2% of the SAE's features fire" in logged[0]
    assert "passed over for a sparse dictionary: layer 0 head 0 (2%), layer 0 head 1 (5%)" in reason


def test_when_no_cell_reaches_the_share_the_densest_tried_cell_is_kept_and_the_reason_says_so():
    cell, sae, reason, trained, _ = run({(0, 0): 0.02, (0, 1): 0.07}, max_cells=2)
    assert trained == [(0, 0), (0, 1)] and cell == (0, 1) and sae == "sae-0-1"
    assert "the most of the 2 cells tried (none reached 10%" in reason


def test_running_out_of_cells_stops_the_search():
    shares = {cell[:2]: 0.0 for cell in REPORT}
    _, _, _, trained, _ = run(shares, max_cells=10)
    assert sorted(trained) == sorted(cell[:2] for cell in REPORT)


@pytest.mark.parametrize("kwargs,match", [({"min_live_share": 1.5}, "min_live_share"), ({"max_cells": 0}, "max_cells")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run({}, **kwargs)
