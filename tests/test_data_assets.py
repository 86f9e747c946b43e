"""The shipped data: tokenizer, held-out evaluation text and the tiny trained models (all offline)."""

from __future__ import annotations

import os

import pytest
import torch

from writesae_lens import data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE = "Fellow-Citizens of the Senate: “It is a truth universally acknowledged”—in 1961, naïve 42% ünïcödé!\n\n\tEnd."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.tokenizer_path())


def test_tokenizer_loads_fast_with_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert len(tokenizer) == 4096
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tokenizer_round_trips(tokenizer):
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SAMPLE
    # The document separator is one special token.
    ids = tokenizer("one<|endoftext|>two", add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 1
    # BPE merges were learned: ordinary English compresses well below one token per character.
    text = data.load_heldout_text()[:20_000]
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text) / 3


def test_heldout_slice_is_nontrivial():
    path = data.heldout_text_path()
    assert path.name == "heldout_eval.txt"
    assert 200_000 < path.stat().st_size < 2_500_000
    docs = data.load_heldout_documents()
    assert len(docs) >= 50
    text = data.load_heldout_text()
    for marker in ("Congress", "Yahweh", "Mr."):  # several sources are represented
        assert marker in text


def test_pretrained_path_rejects_unknown_names():
    with pytest.raises(KeyError, match="valid names: 'qwen35-tiny', 'mamba2-tiny', 'rwkv7-tiny'"):
        data.pretrained_path("gpt2")


@pytest.mark.parametrize("name", sorted(data.PRETRAINED_MODELS))
def test_shipped_model_loads_and_runs(name, tokenizer):
    folder = data.DATA_DIR / "models" / name
    if not (folder / "config.json").exists():
        pytest.skip(f"{folder} has no trained model (build it with scripts/train_models.py)")
    from transformers import AutoModelForCausalLM

    from writesae_lens.models import load_hooked_model

    assert data.pretrained_path(name) == folder
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 15_000_000
    assert sum(f.stat().st_size for f in folder.iterdir()) < 30_000_000  # the budget per model folder
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("The President said", add_special_tokens=False)["input_ids"]])
    if name.startswith("rwkv7"):  # fla's format: transformers does not know it; the library's own model reads it
        model = load_hooked_model(name)
        assert model.cfg.d_vocab == len(tokenizer)
        with torch.no_grad():
            logits = model(ids)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.config.vocab_size == len(tokenizer)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
