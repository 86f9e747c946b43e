"""``writesae sweep``: the config's checks, bad input refused before training, the results, resuming."""

import json
import os
import shutil

import pandas as pd
import pytest
import torch
from sae_lens import SAE

import writesae_lens.saes  # noqa: F401
from writesae_lens.cli import main
from writesae_lens.sweeps import stream
from writesae_lens.sweeps.config import SweepConfigError, parse_config
from writesae_lens.sweeps.distributed import Ranks
from writesae_lens.sweeps.results import win_rate_grid

TINY = """
model = "qwen35-tiny"
seeds = [1]
[cells]
{cells}
[train]
context_size = 16
training_tokens = 128
batch_tokens = 64
lr = 3e-3
warmup_steps = 1
[[variants]]
name = "topk-r1"
d_sae = 16
k = 4
{more}
[substitution]
passages = 3
passage_len = 12
max_firings_per_feature = 2
metrics_passages = 1
"""


def write_config(folder, cells="list = [[0, 1], [2, 3]]", more=""):
    path = folder / "sweep.toml"
    path.write_text(TINY.format(cells=cells, more=more), encoding="utf-8")
    return path


def base(**changes):
    raw = {"model": "qwen35-tiny", "train": {"context_size": 16, "training_tokens": 128, "batch_tokens": 64},
           "variants": [{"name": "a", "d_sae": 16, "k": 4}]}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, message", [
    (dict(variants=[{"name": "a", "architecture": "relu"}]), "unknown architecture 'relu'"),
    (dict(variants=[{"name": "a", "d_sae": 8, "k": 9}]), "k = 9 active atoms cannot exceed d_sae = 8"),
    (dict(variants=[{"name": "a", "k": 2.5}]), "k must be an integer for topk"),
    (dict(variants=[{"name": "a b"}]), "needs a name"),
    (dict(variants=[{"name": "a"}, {"name": "a"}]), "variant names must be distinct"),
    (dict(variants=[{"name": "a", "width": 3}]), r"unknown field\(s\) \['width'\]"),
    (dict(variants=[]), "at least one"),
    (dict(seeds=[1, 1]), "distinct integers"),
    (dict(train={"d_sae": 16}), r"\[train\] has unknown field"),
    (dict(train={"training_tokens": 10, "batch_tokens": 64}), "less than one batch"),
    (dict(cells={"list": [[0, 1]], "layers": [0]}), "either list or layers"),
    (dict(cells={"heads": "some"}), "heads must be"),
    (dict(substitution={"passage_len": 1}), "passage_len must be a positive integer >= 2"),
    (dict(color="red"), "unknown setting"),
])
def test_config_errors_name_the_entry(changes, message):
    with pytest.raises(SweepConfigError, match=message):
        parse_config(base(**changes))


def test_cells_seeds_and_variants_multiply():
    config = parse_config(base(seeds=[1, 2], cells={"layers": [0, 2], "heads": "all"},
                               variants=[{"name": "a", "d_sae": 16, "k": 4},
                                         {"name": "b", "architecture": "batchtopk", "d_sae": 16, "k": 2.5},
                                         {"name": "c", "architecture": "jumprelu", "d_sae": 8}]))
    runs = config.runs([0, 1, 2], n_heads=4)
    assert len(runs) == 2 * 4 * 2 * 3
    assert len({run.name for run in runs}) == len(runs)
    assert config.fingerprint() == parse_config(base(seeds=[1, 2], cells={"layers": [0, 2], "heads": "all"},
                                                     variants=config.to_dict()["variants"])).fingerprint()


def test_ranks_split_runs_without_overlap():
    items = list(range(11))
    shares = [Ranks(rank=r, world=3).share(items) for r in range(3)]
    assert sorted(sum(shares, [])) == items


def test_heatmap_grid_averages_seeds_and_leaves_missing_cells_blank():
    table = pd.DataFrame({"variant": ["a", "a", "a", "b"], "layer": [0, 0, 2, 0], "head": [1, 1, 3, 1],
                          "win_rate": [0.2, 0.4, 0.9, 0.5]})
    grid = win_rate_grid(table, "a", [0, 2], [1, 3])
    assert grid[0, 0] == pytest.approx(0.3) and grid[1, 1] == pytest.approx(0.9)
    assert torch.isnan(torch.tensor(grid[0, 1])) and torch.isnan(torch.tensor(grid[1, 0]))


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(stream, "train_cells", refuse)
    monkeypatch.setattr(stream, "prepare_cell", refuse)


@pytest.mark.parametrize("cells, message", [
    ("list = [[3, 0]]", "layer 3 is not a recurrent layer of qwen35-tiny; recurrent layers: [0, 1, 2]"),
    ("layers = [0]\nheads = [4]", "head 4 is out of range: qwen35-tiny's recurrent layers have heads 0..3"),
])
def test_bad_cells_are_refused_before_training(cells, message, tmp_path, capsys, no_training):
    code, err = run_cli(["sweep", write_config(tmp_path, cells=cells), "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_bad_variant_options_are_refused_before_training(tmp_path, capsys, no_training):
    more = '[[variants]]\nname = "j"\narchitecture = "jumprelu"\nd_sae = 16\noptions = { l0_coef = 1 }'
    code, err = run_cli(["sweep", write_config(tmp_path, more=more), "--out", tmp_path / "out"], capsys)
    assert code == 2 and "variant 'j'" in err and "l0_coef" in err


def test_a_folder_of_another_sweep_or_of_other_files_is_refused(tmp_path, capsys, no_training):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps({"fingerprint": "0123"}))
    code, err = run_cli(["sweep", write_config(tmp_path), "--out", other], capsys)
    assert code == 2 and "holds another sweep" in err
    (other / "sweep.json").unlink()
    (other / "notes.txt").write_text("mine")
    code, err = run_cli(["sweep", write_config(tmp_path), "--out", other], capsys)
    assert code == 2 and "not a sweep's folder" in err
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sweep_writes_the_table_heatmaps_and_resumes_cleanly(tmp_path, capsys, monkeypatch):
    torch.set_num_threads(1)
    config = write_config(tmp_path)
    out = tmp_path / "out"
    code, err = run_cli(["sweep", config, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "results.csv")
    assert list(table["run"]) == ["L0-H1-topk-r1-s1", "L2-H3-topk-r1-s1"]
    pd.testing.assert_frame_equal(table.drop(columns="note"),
                                  pd.read_parquet(out / "results.parquet").drop(columns="note"), check_dtype=False)
    for column in ("mse", "explained_variance", "l0", "dead_latents", "win_rate", "win_low", "win_high",
                   "strict_chain_rate"):
        assert table[column].notna().all(), column
    assert ((table["win_low"] <= table["win_rate"]) & (table["win_rate"] <= table["win_high"])).all()
    assert (out / "heatmaps" / "topk-r1.png").stat().st_size > 0
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (out / "results.csv", out / "sweep.json", out / "runs" / "L0-H1-topk-r1-s1",
                 out / "runs" / "L0-H1-topk-r1-s1" / "row.json"):  # the user's modes, not the staging's private ones
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path
    first = {name: SAE.load_from_disk(out / "runs" / name / "sae").state_dict() for name in table["run"]}
    assert SAE.load_from_disk(out / "runs" / "L2-H3-topk-r1-s1" / "sae").cfg.metadata.hook_head_index == 3

    # an interruption: one run lost (its staging half-written by a process that is gone), one trained only
    shutil.rmtree(out / "runs" / "L0-H1-topk-r1-s1")
    stale = out / ".partial-999999999-r0-x" / "L0-H1-topk-r1-s1"
    stale.mkdir(parents=True)
    (stale / "cfg.json").write_text("{")
    (out / "trained").mkdir(exist_ok=True)
    shutil.move(out / "runs" / "L2-H3-topk-r1-s1" / "sae", out / "trained" / "L2-H3-topk-r1-s1")
    shutil.rmtree(out / "runs" / "L2-H3-topk-r1-s1")
    (out / "results.csv").unlink()

    trained = []
    original = stream.train_cells
    monkeypatch.setattr(stream, "train_cells",
                        lambda cells, **kw: trained.extend(c.name for c in cells) or original(cells, **kw))
    code, err = run_cli(["sweep", config, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert trained == ["L0-H1-topk-r1-s1"]  # the trained run is only evaluated
    assert not (out / ".partial-999999999-r0-x").exists()
    assert not os.listdir(out / "trained")
    again = pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(table, again)
    for name, weights in first.items():
        for key, value in SAE.load_from_disk(out / "runs" / name / "sae").state_dict().items():
            assert torch.equal(value, weights[key]), (name, key)
