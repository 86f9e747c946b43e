"""The `writesae` command line: help, clear errors, and train + substitution end to end on a tiny model."""

import subprocess
import sys

import pytest
import torch

from writesae_lens.cli import build_parser, main


def test_help_lists_every_command_and_option(capsys):
    for argv in (["--help"], ["demo", "--help"], ["train", "--help"], ["substitution", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--layer", "--head", "--d-sae", "--k", "--text", "--device", "--out", "--sae",
                   "--timing", "--kl-at", "--amplitude", "--final-token-only"):
        assert option in out, option


def test_console_script_answers_quickly():
    result = subprocess.run([sys.executable, "-m", "writesae_lens.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "substitution" in result.stdout


def test_bad_options_get_a_clear_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--model", "x", "--layer", "one", "--head", "0", "--out", "o"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
    code = main(["train", "--model", str(tmp_path / "missing"), "--layer", "1", "--head", "0",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code = main(["train", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--out", str(tmp_path / "full")])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code = main(["train", "--model", "qwen35-tiny", "--layer", "3", "--head", "0", "--out", str(tmp_path / "o3"),
                 "--training-tokens", "4096"])
    assert code == 2 and "not a recurrent layer" in capsys.readouterr().err


def test_train_then_substitution(tmp_path, capsys):
    text = tmp_path / "text.txt"
    from writesae_lens.data import load_heldout_documents

    text.write_text("<|endoftext|>".join(load_heldout_documents()[:60]), encoding="utf-8")
    common = ["--model", "qwen35-tiny", "--layer", "2", "--head", "1", "--text", str(text)]
    assert main(["train", *common, "--d-sae", "64", "--k", "4", "--context-size", "64", "--training-tokens",
                 str(64 * 8 * 40), "--batch-tokens", "512", "--lr", "3e-3", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "sae" / "cfg.json").exists()
    assert main(["substitution", *common, "--sae", str(tmp_path / "run" / "sae"), "--passages", "6",
                 "--passage-len", "64", "--max-firings", "60", "--out", str(tmp_path / "test")]) == 0
    out = capsys.readouterr().out
    assert "win rate" in out and "Wilson" in out
    for name in ("records.csv", "summary.txt", "summary.json", "kl_scatter.png", "kl_log_ratio_density.png",
                 "settings.json"):
        assert (tmp_path / "test" / name).stat().st_size > 0, name


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert "win rate" in capsys.readouterr().out


def test_demo_passes_over_a_cell_whose_dictionary_is_too_sparse(tmp_path, capsys, monkeypatch):
    """The demo's wiring, small: no SAE can reach a live share of 100 %, so it trains on two cells, keeps the denser,
    saves only that SAE (in sae/, nothing left in a cells/ folder) and says which cell it passed over."""
    import json

    from writesae_lens import cli

    small = dict(memory_passages=2, memory_len=200, d_sae=32, k=4, context_size=64, training_tokens=64 * 8 * 8,
                 batch_tokens=512, warmup_steps=2, passages=4, passage_len=48, max_firings=40, min_live_share=1.0,
                 max_cells=2)
    monkeypatch.setattr(cli, "DEMO", cli.DEMO | small)
    torch.set_num_threads(1)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert out.count("[2/3] training a WriteSAE") == 2 and "win rate" in out
    reason = json.loads((tmp_path / "demo" / "settings.json").read_text())["cell_reason"]
    assert "the most of the 2 cells tried (none reached 100%" in reason and "passed over for a sparse dictionary" in reason
    assert (tmp_path / "demo" / "sae" / "cfg.json").exists() and not (tmp_path / "demo" / "cells").exists()
    settings = json.loads((tmp_path / "demo" / "settings.json").read_text())["train"]
    saved = json.loads((tmp_path / "demo" / "sae" / "cfg.json").read_text())
    assert f"blocks.{settings['layer']}.mixer.hook_state" == saved["metadata"]["hook_name"]
    assert settings["head"] == saved["metadata"]["hook_head_index"]


def test_demo_takes_any_shipped_model_and_names_them_when_wrong(capsys):
    from writesae_lens.data import PRETRAINED_MODELS

    for name in PRETRAINED_MODELS:
        assert build_parser().parse_args(["demo", "--model", name]).model == name
    assert build_parser().parse_args(["demo"]).model == "qwen35-tiny"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--model", "gpt2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and all(name in err for name in PRETRAINED_MODELS)


def test_training_is_reproducible_and_leaves_the_global_generator_alone(tmp_path):
    """One seed gives one SAE (SAELens draws from torch's global generator without seeding it; the job seeds it and
    restores it), also with several threads (the decoder's backward sums repeated atoms in a fixed order)."""
    import torch

    from writesae_lens import pipeline
    from writesae_lens.models import load_hooked_model

    model = load_hooked_model("qwen35-tiny").eval()
    documents = pipeline.load_texts(None)[:40]
    settings = pipeline.TrainSettings(layer=1, head=0, d_sae=64, k=8, training_tokens=2048 * 4, warmup_steps=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(123)
        before = torch.rand(3)
        torch.manual_seed(123)
        saes = [pipeline.train_state_sae(model, documents, settings, tmp_path / f"run{i}") for i in range(2)]
        assert torch.equal(torch.rand(3), before)  # the caller's generator continues where it was
    finally:
        torch.set_num_threads(threads)
    first, second = (sae.state_dict() for sae in saes)
    assert all(torch.equal(first[name], second[name]) for name in first)
