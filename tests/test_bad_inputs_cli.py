"""Bad input on the command line: exit code 2 and one message that names the bad value and what is valid; nothing
written to --out; nothing silently wrong (an SAE of another model, the wrong part of a --text file)."""

from __future__ import annotations

import json

import pytest
from bad_input_helpers import copy_of_model, saved_write_sae

from writesae_lens.cli import main

SUBST = ["substitution", "--model", "qwen35-tiny", "--layer", "1", "--head", "0"]
TRAIN = ["train", "--model", "qwen35-tiny", "--layer", "1", "--head", "0"]
SMALL = ["--passages", "3", "--passage-len", "32", "--max-firings", "12"]


@pytest.fixture(scope="module")
def qwen_sae(tmp_path_factory):
    """A random WriteSAE recorded for qwen35-tiny, blocks.1.mixer.hook_state, head 0."""
    return saved_write_sae(tmp_path_factory.mktemp("saes") / "qwen", model_name="qwen35-tiny", layer=1, head=0)


def run_cli(argv, capsys) -> tuple[int, str]:
    """main()'s exit code (argparse's too) and its stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- counts: argparse names the value and the range


@pytest.mark.parametrize("option, value, valid", [
    ("--max-firings", "-1", "a positive integer"),
    ("--max-firings", "0", "a positive integer"),
    ("--max-firings-per-feature", "0", "a positive integer"),
    ("--passages", "0", "a positive integer"),
    ("--passages", "-5", "a positive integer"),
    ("--passage-len", "0", "an integer >= 2"),
    ("--passage-len", "1", "an integer >= 2"),
    ("--batch-size", "0", "a positive integer"),
    ("--passage-batch-size", "-1", "a positive integer"),
    ("--passages", "ten", "a positive integer"),
])
def test_substitution_counts(option, value, valid, qwen_sae, tmp_path, capsys):
    code, err = run_cli([*SUBST, "--sae", qwen_sae, option, value, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert f"argument {option}" in err and value in err and valid in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, valid", [
    ("--batch-tokens", "0", "a positive integer"),
    ("--training-tokens", "0", "a positive integer"),
    ("--d-sae", "-3", "a positive integer"),
    ("--k", "0", "a positive integer"),
    ("--context-size", "0", "a positive integer"),
    ("--warmup-steps", "-1", "an integer >= 0"),
    ("--lr", "0", "a finite number > 0"),
    ("--lr", "nan", "a finite number > 0"),
])
def test_train_counts(option, value, valid, tmp_path, capsys):
    code, err = run_cli([*TRAIN, option, value, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert f"argument {option}" in err and value in err and valid in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--context-size", "64", "--batch-tokens", "2048"],
     "batch_tokens = 2048 is larger than SAELens' activation buffer of 1024 states"),
    (["--training-tokens", "1000", "--batch-tokens", "2048", "--context-size", "128"],
     "training_tokens = 1000 is less than one batch (batch_tokens = 2048)"),
    (["--d-sae", "16", "--k", "32"], "k = 32 active atoms cannot exceed the dictionary size d_sae = 16"),
])
def test_train_settings_that_cannot_train(extra, message, tmp_path, capsys):
    code, err = run_cli([*TRAIN, *extra, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- output folders


def test_out_that_is_a_file(qwen_sae, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, err = run_cli([*SUBST, "--sae", qwen_sae, *SMALL, "--out", tmp_path / "file", "--overwrite"], capsys)
    assert code == 2 and f"output folder {tmp_path / 'file'} is a file" in err
    assert (tmp_path / "file").read_text() == "mine"


def test_out_under_a_file(qwen_sae, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, err = run_cli([*SUBST, "--sae", qwen_sae, *SMALL, "--out", tmp_path / "file" / "o"], capsys)
    assert code == 2 and f"lies under {tmp_path / 'file'}, which is a file" in err


# ---------------------------------------------------------------- the SAE: another model, hook or head; broken files


def test_sae_of_another_model_is_refused_then_accepted_with_the_override(qwen_sae, tmp_path, capsys):
    argv = ["substitution", "--model", "mamba2-tiny", "--layer", "1", "--head", "0", "--sae", qwen_sae, *SMALL]
    code, err = run_cli([*argv, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "trained on model 'qwen35-tiny', not on 'mamba2-tiny'" in err and "--ignore-sae-metadata" in err
    assert not (tmp_path / "o").exists()
    code, _ = run_cli([*argv, "--ignore-sae-metadata", "--out", tmp_path / "o"], capsys)
    assert code == 0 and (tmp_path / "o" / "records.csv").exists()
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["ignore_sae_metadata"] is True


@pytest.mark.parametrize("layer, head, message", [
    ("2", "0", "trained on 'blocks.1.mixer.hook_state', not on 'blocks.2.mixer.hook_state'"),
    ("1", "3", "trained on head 0, not on head 3"),
])
def test_sae_of_another_cell(layer, head, message, qwen_sae, tmp_path, capsys):
    argv = ["substitution", "--model", "qwen35-tiny", "--layer", layer, "--head", head, "--sae", qwen_sae, *SMALL]
    code, err = run_cli([*argv, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err


def test_sae_folder_without_cfg(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli([*SUBST, "--sae", tmp_path / "empty", *SMALL, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{tmp_path / 'empty'} is not a saved SAE folder (no cfg.json)" in err


def test_sae_cfg_that_is_not_json(qwen_sae, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(qwen_sae, tmp_path / "sae")
    (broken / "cfg.json").write_text("{not json")
    code, err = run_cli([*SUBST, "--sae", broken, *SMALL, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{broken / 'cfg.json'} is not valid JSON" in err


def test_sae_with_truncated_weights(qwen_sae, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(qwen_sae, tmp_path / "sae")
    weights = broken / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = run_cli([*SUBST, "--sae", broken, *SMALL, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"cannot load the SAE in {broken}" in err and "truncated" in err


def test_sae_with_nan_weights(qwen_sae, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(qwen_sae, tmp_path / "sae")
    weights = broken / "sae_weights.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, weights)
    code, err = run_cli([*SUBST, "--sae", broken, *SMALL, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"non-finite values (NaN or inf) in '{name}'" in err


# ---------------------------------------------------------------- the model, device, text


def test_model_with_truncated_weights(qwen_sae, tmp_path, capsys):
    folder = copy_of_model("qwen35-tiny", tmp_path / "m")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5000])
    argv = ["substitution", "--model", folder, "--layer", "1", "--head", "0", "--sae", qwen_sae, *SMALL]
    code, err = run_cli([*argv, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"cannot read {folder / 'model.safetensors'} (5000 bytes)" in err


def test_model_config_not_json(tmp_path, capsys):
    folder = copy_of_model("qwen35-tiny", tmp_path / "m")
    (folder / "config.json").write_text("")
    code, err = run_cli(["train", "--model", folder, "--layer", "1", "--head", "0", "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{folder / 'config.json'} is not valid JSON" in err


@pytest.mark.parametrize("device, message", [("gpu", "device 'gpu' is not a torch device name"),
                                             ("cuda:99", "device 'cuda:99'")])
def test_device(device, message, qwen_sae, tmp_path, capsys):
    code, err = run_cli([*SUBST, "--sae", qwen_sae, *SMALL, "--device", device, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err


def test_dtype_choice(qwen_sae, tmp_path, capsys):
    code, err = run_cli([*SUBST, "--sae", qwen_sae, "--dtype", "float8", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "argument --dtype: invalid choice: 'float8'" in err and "bfloat16" in err


@pytest.mark.parametrize("content, message", [("", "holds no text"), (None, "does not exist")])
def test_text_file(content, message, qwen_sae, tmp_path, capsys):
    text = tmp_path / "t.txt"
    if content is not None:
        text.write_text(content)
    code, err = run_cli([*SUBST, "--sae", qwen_sae, *SMALL, "--text", text, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{text}" in err and message in err


def test_substitution_text_is_evaluated_whole(qwen_sae, tmp_path):
    """substitution's --text is the user's evaluation text: every document is used, not the last fifth (the split is
    for commands that also train on --text)."""
    from types import SimpleNamespace

    from writesae_lens import pipeline
    from writesae_lens.commands.common import heldout_passages
    from writesae_lens.models import load_hooked_model

    model = load_hooked_model("qwen35-tiny")
    documents = pipeline.load_texts(None)[:10]
    text = tmp_path / "t.txt"
    text.write_text("<|endoftext|>".join(documents))
    passages = heldout_passages(model, SimpleNamespace(text=text, device="cpu"), 2, 16, whole_text=True)
    first = model.tokenizer.encode(documents[0], add_special_tokens=False)[:16]
    assert passages[0].tolist() == first
    held_out = heldout_passages(model, SimpleNamespace(text=text, device="cpu"), 2, 16)  # a command that trains
    assert held_out[0].tolist() == model.tokenizer.encode(documents[8], add_special_tokens=False)[:16]
    shipped = heldout_passages(model, SimpleNamespace(text=None, device="cpu"), 2, 16, whole_text=True)
    _, held_out = pipeline.split_documents(pipeline.load_texts(None))
    assert shipped[0].tolist() == model.tokenizer.encode(held_out[0], add_special_tokens=False)[:16]


def test_substitution_reads_the_first_documents_of_text(qwen_sae, tmp_path, capsys):
    """Only the first of two documents is long enough for the passages: the run must read it (the last fifth of the
    documents alone, the old behaviour, holds too few tokens)."""
    from writesae_lens import pipeline

    text = tmp_path / "t.txt"
    text.write_text("<|endoftext|>".join([" ".join(pipeline.load_texts(None)[:6]), "short"]))
    code, err = run_cli([*SUBST, "--sae", qwen_sae, *SMALL, "--text", text, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert len(pipeline.load_texts(text)) == 2
    assert (tmp_path / "o" / "records.csv").stat().st_size > 0
