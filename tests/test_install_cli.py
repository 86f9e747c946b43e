"""``writesae install`` and ``writesae steer``: end to end on the shipped tiny model (small sizes), the files they
write, and clear errors (exit code 2) for bad input."""

import json

import pandas as pd
import pytest
import torch

from writesae_lens import pipeline
from writesae_lens.cli import main
from writesae_lens.models import load_hooked_model


@pytest.fixture(scope="module")
def sae_folders(tmp_path_factory):
    """Tiny WriteSAEs trained with SAELens on two heads of the shipped model's layer 1 (seconds each)."""
    torch.set_num_threads(1)
    model = load_hooked_model("qwen35-tiny")
    train, _ = pipeline.split_documents(pipeline.load_texts(None)[:80])
    root = tmp_path_factory.mktemp("saes")
    folders = {}
    for head in (0, 1):
        settings = pipeline.TrainSettings(layer=1, head=head, d_sae=32, k=4, context_size=64,
                                          training_tokens=64 * 8 * 30, batch_tokens=512, lr=3e-3, warmup_steps=5)
        pipeline.train_state_sae(model, train, settings, root / f"h{head}")
        folders[head] = root / f"h{head}"
    return folders


def test_install_writes_records_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "install"
    code = main(["install", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--prompts", "3",
                 "--prompt-len", "12", "--windows", "2", "--new-tokens", "5", "--multipliers", "3", "--rare-rank",
                 "2000", "--out-of-context-rank", "1000", "--out", str(out)])
    assert code == 0
    records = pd.read_csv(out / "records.csv")
    assert len(records) > 0 and set(records.target_class) <= {"mid", "rare", "frequent", "semantic"}
    summary = json.loads((out / "summary.json").read_text())
    assert {row["target_class"] for row in summary} >= {"pooled"}
    for name in ("summary.txt", "summary.csv", "inclusion.png", "settings.json"):
        assert (out / name).exists()
    assert "Three-position install" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--rare-rank", "100000"], "does not fit a vocabulary"),
    (["--multipliers", "nan"], "finite"),
    (["--prompt-len", "3"], "past the prompt"),
    (["--head", "17"], "head 17"),
])
def test_install_bad_input_is_exit_code_2(tmp_path, capsys, argv, match):
    base = ["install", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--prompts", "2", "--prompt-len",
            "12", "--windows", "1", "--new-tokens", "3", "--rare-rank", "2000", "--out-of-context-rank", "1000",
            "--out", str(tmp_path / "x")]
    assert main(base + argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_steer_erase_and_amplify(tmp_path, sae_folders, capsys):
    from safetensors.torch import load_file

    sparsity = load_file(str(sae_folders[0] / "sparsity.safetensors"))["sparsity"]
    feature = int(sparsity.argmax())  # the most frequent feature
    out = tmp_path / "erase"
    assert main(["steer", "erase", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--sae",
                 str(sae_folders[0]), "--feature", str(feature), "--passages", "6", "--passage-len", "32",
                 "--eval-firings", "6", "--nonfiring", "5", "--dose-positions", "3", "--out", str(out)]) == 0
    for name in ("detection.csv", "erasure.csv", "nonfiring.csv", "dose.csv", "summary.txt", "summary.json",
                 "dose.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["feature"] == feature

    out = tmp_path / "amplify"
    assert main(["steer", "amplify", "--model", "qwen35-tiny", "--layer", "1", "--heads", "0", "1", "--sae",
                 str(sae_folders[0]), str(sae_folders[1]), "--prompts", "3", "--prompt-len", "8",
                 "--selection-passages", "6", "--passage-len", "48", "--top", "3", "--new-tokens", "10",
                 "--out", str(out)]) == 0
    records = pd.read_csv(out / "records.csv")
    assert sorted(records.condition.unique()) == sorted(["baseline", "2x", "5x", "10x", "random 10x"])
    assert (out / "amplification.png").exists()


def test_steer_bad_input_is_exit_code_2(tmp_path, sae_folders, capsys):
    common = ["--model", "qwen35-tiny", "--layer", "1", "--out", str(tmp_path / "x")]
    assert main(["steer", "erase", *common, "--head", "1", "--sae", str(sae_folders[0]), "--feature", "0",
                 "--passages", "2", "--passage-len", "16"]) == 2
    assert "head" in capsys.readouterr().err  # the SAE of head 0 on head 1
    assert main(["steer", "amplify", *common, "--heads", "0", "1", "--sae", str(sae_folders[0])]) == 2
    assert "one SAE per head" in capsys.readouterr().err
    assert main(["steer", "amplify", *common, "--heads", "0", "--sae", str(sae_folders[0]), "--boundary",
                 "a long phrase"]) == 2
    assert "exactly one" in capsys.readouterr().err
