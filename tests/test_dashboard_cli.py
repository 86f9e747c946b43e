"""``writesae dashboard`` on the shipped model: the files it writes, that the index and pages agree with the library
call on the same passages, the --partition / --records joins, staging (nothing in --out on failure) and clear errors
(exit code 2) for bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sae_checks import firing_sae
from writesae_lens import pipeline
from writesae_lens.cli import main
from writesae_lens.dashboard import build_dashboard_data
from writesae_lens.dashboard.render import atom_page_name
from writesae_lens.evaluation.records import RECORD_COLUMNS, save_records
from writesae_lens.models import load_hooked_model

LAYER, HEAD = 1, 0
MODEL = ["--model", "qwen35-tiny", "--layer", str(LAYER), "--head", str(HEAD)]
SIZES = ["--passages", "4", "--passage-len", "48"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A firing WriteSAE on the shipped model saved to disk, an atoms.csv and synthetic records for it."""
    folder = tmp_path_factory.mktemp("dashboard_cli")
    model = load_hooked_model("qwen35-tiny")
    _, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
    passages = pipeline.token_passages(model, eval_docs, 4, 48)
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=16, k=4)
    sae.save_model(folder / "sae")
    (folder / "partition").mkdir()
    pd.DataFrame({"atom": range(16), "n_firings": 5, "median_cos": np.linspace(-0.2, 0.4, 16),
                  "class": ["register" if i % 2 else "bundle" for i in range(16)]}).to_csv(
        folder / "partition" / "atoms.csv", index=False)
    rng = np.random.default_rng(0)
    rows = [{name: 0 for name in RECORD_COLUMNS} | {"atom": a, "feature": a, "passage": i, "kl_atom": rng.random(),
                                                    "kl_delete": rng.random(), "kl_random": rng.random()}
            for a in range(16) for i in range(6)]
    save_records(pd.DataFrame(rows), folder / "records.csv")
    data = build_dashboard_data(model, sae, LAYER, HEAD, passages, n_atoms=5, progress=False)
    return folder, data


def test_dashboard_command(saved, tmp_path, capsys):
    folder, data = saved
    out = tmp_path / "out"
    code = main(["dashboard", *MODEL, "--sae", str(folder / "sae"), *SIZES, "--atoms", "5",
                 "--partition", str(folder / "partition"), "--records", str(folder / "records.csv"),
                 "--out", str(out)])
    assert code == 0
    assert "5 atom pages" in capsys.readouterr().out
    pages = sorted((out / "atoms").iterdir())
    assert [p.name for p in pages] == [atom_page_name(p.atom) for p in data.atoms]
    features = json.loads((out / "features.json").read_text(encoding="utf-8"))
    assert [f["feature_index"] for f in features["features"]] == [p.atom for p in data.atoms]
    for feature, page in zip(features["features"], data.atoms):
        assert feature["maxActApprox"] == pytest.approx(page.activation["max"])
        assert feature["writesae"]["partition"]["class"] == ("register" if page.atom % 2 else "bundle")
        assert feature["writesae"]["substitution"]["n"] == 6
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "register" in index and "win rate" in index
    assert json.loads((out / "settings.json").read_text())["atoms"] == 5


def test_dashboard_command_bad_input(saved, tmp_path, capsys):
    folder, _ = saved
    base = ["dashboard", *MODEL, "--sae", str(folder / "sae"), *SIZES]
    out = tmp_path / "out"
    assert main([*base, "--partition", str(tmp_path), "--out", str(out)]) == 2
    assert "atoms.csv" in capsys.readouterr().err
    assert main([*base, "--records", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--atom-ids", "99", "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists(), "a failed run leaves nothing in --out"
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--atoms", "0", "--out", str(out)])
    assert exit_info.value.code == 2
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([*base, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
