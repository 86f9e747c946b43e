"""TransformerLens' conveniences on the three families (#14 parts 5 and 6).

Written in the spirit of TransformerLens' tests/unit/test_utils.py, test_tokenization_methods.py and
tests/acceptance/test_hooked_transformer.py (to_single_token, get_token_position, to_str_tokens with prepend_bos,
utils.test_prompt, string batches with padding_side, the config fields users read, dtype handling), on models with
the shipped tokenizer. Every family in bf16 / fp16 / fp64 is checked against an fp32 copy holding the same rounded
weights.
"""

import pytest
import torch

from closeness import relative_error
from tl_helpers import random_tokens

PROMPT = "The cat sat on the mat because the cat was tired"


def test_to_single_token(text_model):
    token = text_model.to_single_token(" the")
    assert text_model.to_tokens(" the", prepend_bos=False).tolist() == [[token]]
    assert text_model.tokenizer.decode([token]) == " the"
    with pytest.raises(ValueError, match="not one"):
        text_model.to_single_token(" the cat sat")


def test_get_token_position(text_model):
    tokens = text_model.to_tokens(PROMPT, prepend_bos=False)[0]
    the = text_model.to_single_token(" the")
    where = (tokens == the).nonzero().flatten().tolist()
    assert len(where) == 2
    assert text_model.get_token_position(" the", PROMPT, prepend_bos=False) == where[0]
    assert text_model.get_token_position(the, tokens, mode="last") == where[1]
    assert text_model.get_token_position(" the", PROMPT, prepend_bos=True) == where[0] + 1
    missing = next(t for t in range(text_model.cfg.d_vocab) if t not in tokens.tolist())
    with pytest.raises(ValueError, match="does not occur"):
        text_model.get_token_position(missing, tokens)
    with pytest.raises(ValueError, match="mode"):
        text_model.get_token_position(the, tokens, mode="middle")


def test_to_str_tokens(text_model):
    plain = text_model.to_str_tokens(PROMPT, prepend_bos=False)
    assert "".join(plain) == PROMPT
    with_bos = text_model.to_str_tokens(PROMPT, prepend_bos=True)
    assert with_bos[1:] == plain and with_bos[0] == text_model.tokenizer.decode([text_model.tokenizer.bos_token_id])
    tokens = text_model.to_tokens(PROMPT, prepend_bos=False)
    assert text_model.to_str_tokens(tokens) == plain == text_model.to_str_tokens(tokens[0])
    assert text_model.to_str_tokens([PROMPT, " the"], prepend_bos=False) == [plain, [" the"]]
    assert text_model.to_str_tokens(int(tokens[0, 1])) == [plain[1]]


@pytest.mark.filterwarnings("ignore:The 'utils' module has been deprecated")
def test_utils_test_prompt_runs(text_model, capsys):
    from transformer_lens.utils import test_prompt

    test_prompt("The cat sat on the", "mat", text_model, prepend_bos=False, top_k=3)
    printed = capsys.readouterr().out
    assert "Tokenized prompt:" in printed and "Top 0th token" in printed and "Rank" in printed


@pytest.mark.parametrize("side", ["left", "right"])
def test_string_batches_are_padded_and_masked(text_model, side):
    """A list of strings is padded on ``padding_side`` and masked: each row's logits at its real tokens equal the
    string alone, and the mean loss is over real next-token pairs only."""
    texts = ["The cat sat", "A much longer sentence about a tired cat"]
    with torch.no_grad():
        logits = text_model(texts, padding_side=side, prepend_bos=False)
        loss = text_model(texts, padding_side=side, prepend_bos=False, return_type="loss")
        alone = [text_model(t, prepend_bos=False) for t in texts]
        losses = [text_model(t, prepend_bos=False, return_type="loss", loss_per_token=True)[0] for t in texts]
    for row, one in zip(logits, alone):
        n = one.shape[1]
        real = row[-n:] if side == "left" else row[:n]
        assert relative_error(real, one[0]) < 1e-5
    assert abs(float(loss) - float(torch.cat(losses).mean())) < 1e-5
    tokens, mask = text_model.to_tokens_and_mask(texts, prepend_bos=False, padding_side=side)
    assert tokens.shape == logits.shape[:2] and int(mask.sum()) == sum(o.shape[1] for o in alone)
    assert bool(mask[0, 0] == (1 if side == "right" else 0))
    with pytest.raises(Exception, match="padding_side"):  # ValueError; the test run's type checker may come first
        text_model.to_tokens(texts, padding_side="middle")


def test_generate_string_batches_are_left_padded(text_model):
    texts = ["The cat sat", "A much longer sentence about a cat"]
    out = text_model.generate(texts, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False,
                              prepend_bos=False, return_type="tokens")
    for row, text in zip(out, texts):
        alone = text_model.generate(text, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False,
                                    prepend_bos=False, return_type="tokens")
        assert row[-3:].tolist() == alone[0, -3:].tolist()


def test_config_fields_transformer_lens_users_read(model):
    cfg = model.cfg
    expected = {"HookedQwen35": ("Qwen3_5ForCausalLM", "RMS"), "HookedMamba2": ("Mamba2ForCausalLM", "RMS"),
                "HookedRWKV7": ("RWKV7ForCausalLM", "LN")}[type(model).__name__]
    assert (cfg.original_architecture, cfg.normalization_type) == expected
    assert cfg.d_vocab_out == cfg.d_vocab == model.W_U.shape[1]
    as_dict = cfg.to_dict()
    for name in ("n_layers", "d_model", "d_vocab", "d_vocab_out", "n_heads", "d_k", "d_v", "n_ctx", "dtype", "device",
                 "model_name", "original_architecture", "normalization_type", "default_prepend_bos", "layer_types"):
        assert name in as_dict, name
    assert as_dict["d_model"] == cfg.d_model and as_dict["dtype"] == cfg.dtype


@pytest.mark.parametrize("kwargs", [dict(dtype="float64"), dict(dtype=torch.float64), dict(torch_dtype="float64"),
                                    dict(torch_dtype=torch.float64), dict(dtype="float64", torch_dtype=torch.float64)])
def test_from_pretrained_dtype_names(mamba2_folders, kwargs):
    from writesae_lens.adapters.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(mamba2_folders["head_per_group"], load_tokenizer=False, **kwargs)
    assert model.cfg.dtype == torch.float64 == model.W_E.dtype


def test_from_pretrained_dtype_conflicts_and_default(mamba2_folders):
    from writesae_lens.adapters.mamba2 import HookedMamba2

    folder = mamba2_folders["head_per_group"]
    with pytest.raises(ValueError, match="disagree"):
        HookedMamba2.from_pretrained(folder, load_tokenizer=False, dtype="float32", torch_dtype=torch.float16)
    assert HookedMamba2.from_pretrained(folder, load_tokenizer=False).cfg.dtype == torch.float32


def test_cfg_dtype_follows_casts(mamba2_folders):
    from writesae_lens.adapters.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(mamba2_folders["head_per_group"], load_tokenizer=False)
    for cast, dtype in ((lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                        (lambda m: m.double(), torch.float64), (lambda m: m.float(), torch.float32),
                        (lambda m: m.to("cpu", torch.float16), torch.float16)):
        cast(model)
        assert model.cfg.dtype == dtype == model.W_E.dtype


def same_weights_in(family: str, dtype, folders: dict):
    """The family's tiny random model with its weights in ``dtype``."""
    if family == "rwkv7":
        from rwkv7_factory import random_rwkv7

        return random_rwkv7(97, seed=7).to(dtype)
    from writesae_lens.adapters.mamba2 import HookedMamba2
    from writesae_lens.adapters.qwen35 import HookedQwen35

    cls = HookedQwen35 if family == "qwen35" else HookedMamba2
    return cls.from_pretrained(folders[family], dtype=dtype, load_tokenizer=False).eval()


@pytest.mark.parametrize("family", ["qwen35", "mamba2", "rwkv7"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-1), (torch.float16, 1e-2), (torch.float64, 1e-4)])
def test_every_family_runs_in_low_and_high_precision(family, dtype, tolerance, qwen35_folders, mamba2_folders):
    """Every dtype runs (RWKV-7 in bf16 / fp16 failed in its output GroupNorm), close to an fp32 copy holding the
    same rounded weights, and the cached continuation equals the full run."""
    folders = {"qwen35": qwen35_folders["gqa_nonsquare"], "mamba2": mamba2_folders["grouped_nonsquare"]}
    model = same_weights_in(family, dtype, folders)
    reference = same_weights_in(family, dtype, folders).float()
    tokens = random_tokens(model, batch=2, n_pos=9, seed=8)
    with torch.no_grad():
        logits = model(tokens)
        expected = reference(tokens)
        cache = model.empty_cache()
        model(tokens[:, :5], cache=cache)
        stepped = model(tokens[:, 5:], cache=cache)
    assert logits.dtype == dtype and model.cfg.dtype == dtype
    assert relative_error(logits.double(), expected.double()) < tolerance
    assert relative_error(stepped.double(), logits[:, 5:].double()) < tolerance
