"""``writesae partition`` and ``writesae baselines`` on the shipped model: the files they write, what they hold, and
clear errors (exit code 2) for bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from sae_checks import firing_sae
from writesae_lens import pipeline
from writesae_lens.cli import main
from writesae_lens.evaluation.records import save_records
from writesae_lens.evaluation.substitution import replacement_test
from writesae_lens.models import load_hooked_model

LAYER, HEAD = 1, 0
MODEL = ["--model", "qwen35-tiny", "--layer", str(LAYER), "--head", str(HEAD)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A firing WriteSAE on the shipped model saved to disk, and the records of a substitution run with it."""
    folder = tmp_path_factory.mktemp("partition_cli")
    model = load_hooked_model("qwen35-tiny")
    _, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
    passages = pipeline.token_passages(model, eval_docs, 6, 64)
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=32, k=4)
    sae.save_model(folder / "sae")
    records = replacement_test(model, sae, LAYER, HEAD, passages, max_firings=60, progress=False)
    save_records(records, folder / "records.csv")
    return folder


def test_partition_command(saved, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["partition", *MODEL, "--sae", str(saved / "sae"), "--passages", "6", "--passage-len", "64",
                 "--records", str(saved / "records.csv"), "--bits-passages", "2", "--n-init", "2", "--min-firings", "2",
                 "--out", str(out)])
    assert code == 0
    for name in ("firings.csv", "atoms.csv", "mixtures.csv", "thresholds.csv", "class_win_rates.csv",
                 "cosine_bins.csv", "failure_quartiles.csv", "summary.txt", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "cosine_histogram.png").read_bytes().startswith(b"\x89PNG")
    atoms = pd.read_csv(out / "atoms.csv")
    assert len(atoms) == 32 and set(atoms["class"]) <= {"register", "bundle", "null"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"]["register"] == int((atoms["class"] == "register").sum())
    if summary["partition"]["register"]:
        assert len(pd.read_csv(out / "passage_bits.csv")) == 2
        assert "numerical floor" in (out / "summary.txt").read_text()
    assert "Register / bundle partition" in capsys.readouterr().out


def test_partition_command_bad_input(saved, tmp_path, capsys):
    base = ["partition", *MODEL, "--sae", str(saved / "sae")]
    assert main([*base, "--records", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--passages", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--passages must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_baselines_command(saved, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["baselines", *MODEL, "--sae", str(saved / "sae"), "--d-sae", "32", "--k", "4", "--context-size", "32",
                 "--training-tokens", str(32 * 8 * 4), "--batch-tokens", "256", "--lr", "3e-3", "--warmup-steps", "1",
                 "--passages", "3", "--passage-len", "48", "--max-firings", "20", "--recon-passages", "2",
                 "--recon-len", "96", "--ranks", "1", "4", "64", "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out / "substitution_table.csv")
    assert table["substitute"].tolist() == ["writesae", "flat_svd_reconstruction", "flat_svd_atom", "rank2"]
    assert table.loc[0, "reference_minus_pp"] == 0
    recon = pd.read_csv(out / "reconstruction_table.csv")
    assert recon["condition"].tolist() == ["native", "writesae", "flat", "rank2", "svd_rank_1", "svd_rank_4"]
    assert recon.loc[0, "ppl_change_pct"] == 0
    assert (out / "flat_sae" / "cfg.json").exists() and (out / "rank2_sae" / "cfg.json").exists()
    assert json.loads((out / "rank2_sae" / "cfg.json").read_text())["rank"] == 2
    assert (out / "reconstruction.png").read_bytes().startswith(b"\x89PNG")
    for name in ("records_writesae.csv", "records_flat_svd_reconstruction.csv", "reconstruction.csv", "summary.txt"):
        assert (out / name).stat().st_size > 0
    assert "Reconstruction spliced into the cache" in capsys.readouterr().out
    assert main(["baselines", *MODEL, "--sae", str(saved / "sae"), "--flat-sae", str(tmp_path),
                 "--out", str(tmp_path / "c")]) == 2


def test_baselines_command_on_every_head(saved, tmp_path):
    """The given baselines are loaded, not trained; --layer-saes adds the splice of every head of the layer."""
    model = load_hooked_model("qwen35-tiny")
    passages = pipeline.token_passages(model, pipeline.load_texts(None), 4, 64)
    for h in range(model.cfg.n_heads):
        firing_sae(model, passages, LAYER, h, d_sae=16, k=2, seed=h).save_model(tmp_path / "layer" / f"head_{h}")
    out = tmp_path / "out"
    code = main(["baselines", *MODEL, "--sae", str(saved / "sae"), "--flat-sae", str(tmp_path / "layer" / "head_1"),
                 "--rank2-sae", str(saved / "sae"), "--layer-saes", str(tmp_path / "layer"), "--passages", "2",
                 "--passage-len", "48", "--max-firings", "10", "--recon-passages", "2", "--recon-len", "64",
                 "--ranks", "2", "--out", str(out)])
    assert code == 0
    recon = pd.read_csv(out / "reconstruction_table.csv")
    assert "writesae_all_heads" in set(recon.condition) and "svd_rank_2_all_heads" in set(recon.condition)
    assert not (out / "flat_sae").exists()
    assert main(["baselines", *MODEL, "--sae", str(saved / "sae"), "--layer-saes", str(tmp_path),
                 "--out", str(tmp_path / "d")]) == 2
