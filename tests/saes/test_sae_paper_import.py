"""Importing the paper's checkpoints: synthetic files of the released format, checked against a
reference implementation of the paper's SAE forward written here from the method spec (2.1-2.3).
"""

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE

import writesae_lens.saes as ws
from writesae_lens.saes.paper_checkpoint import (
    ImportedBatchTopKSAE,
    ImportedWriteBatchTopKSAE,
    estimate_batchtopk_threshold_,
)

N_F, D_K, D_V, K = 16, 4, 6, 3


# ---- the paper's forward, as its method spec describes it ---------------------------------------


def paper_encode(state: dict, config: dict, X: torch.Tensor) -> torch.Tensor:
    """Pre-activations of the paper's SAEs; the encoder sees the raw state (no centring)."""
    sae_type = config["sae_type"]
    if sae_type in ("bilinear", "bilinear_jumprelu"):
        return torch.einsum("frk,bkv,frv->bf", state["V_enc"], X, state["W_enc"]) + state["b_enc"]
    if sae_type == "bilinear_tied":
        return torch.einsum("frk,bkv,frv->bf", state["V_dec"], X, state["W_dec"]) + state["b_enc"]
    # rank1 (MatrixSAE) and flat: nn.Linear on vec(X)
    return X.reshape(X.shape[0], -1) @ state["encoder.weight"].T + state["encoder.bias"]


def paper_activate(z: torch.Tensor, state: dict, config: dict) -> torch.Tensor:
    if config["sae_type"] == "bilinear_jumprelu":
        return z * (z > state["log_threshold"].exp())
    k = config["k"]
    if config.get("use_batchtopk"):
        flat = z.relu().flatten()
        values, indices = flat.topk(k * z.shape[0])
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(z.shape)
    values, indices = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, indices, values.relu())


def paper_decode(a: torch.Tensor, state: dict, config: dict) -> torch.Tensor:
    if config["sae_type"] == "flat":
        return a @ state["decoder.weight"].T + state["decoder.bias"]
    if config["sae_type"] == "rank1":
        key, value = state["V"], state["W"]
    else:
        key, value = state["V_dec"], state["W_dec"]
    return (torch.einsum("bf,frk,frv->bkv", a, key, value) + state["bias"]).reshape(a.shape[0], -1)


def paper_forward(checkpoint: dict, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = {n: t.double() for n, t in checkpoint["model_state_dict"].items()}
    for name in ("V_enc", "W_enc", "V_dec", "W_dec", "V", "W"):  # old files: [F, d] -> [F, 1, d]
        if name in state and state[name].dim() == 2:
            state[name] = state[name][:, None]
    config = checkpoint["config"]
    codes = paper_activate(paper_encode(state, config, X), state, config)
    return codes, paper_decode(codes, state, config)


# ---- synthetic checkpoints in the released format ------------------------------------------------


def convert(checkpoint, **kwargs):
    """The import with the layout given (these synthetic [D_K, D_V] checkpoints are of no known family: "auto" would
    refuse them; the layout decision has its own tests below)."""
    kwargs.setdefault("state_layout", "key_first")
    return ws.convert_paper_checkpoint(checkpoint, **kwargs)


def make_paper_checkpoint(sae_type, rank=1, use_batchtopk=False, two_d=False, seed=0, with_config=True, d_k=None,
                          d_v=None):
    d_k, d_v = D_K if d_k is None else d_k, D_V if d_v is None else d_v
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    def factor(d):
        f = torch.nn.functional.normalize(rand(N_F, rank, d), dim=-1)
        return f[:, 0] if two_d else f

    state: dict[str, torch.Tensor] = {"steps_since_active": torch.zeros(N_F)}
    if sae_type in ("bilinear", "bilinear_jumprelu"):
        state |= {"V_enc": factor(d_k), "W_enc": factor(d_v), "b_enc": rand(N_F, scale=0.1)}
    if sae_type == "bilinear_tied":
        state["b_enc"] = rand(N_F, scale=0.1)
    if sae_type in ("bilinear", "bilinear_jumprelu", "bilinear_tied"):
        state |= {"V_dec": factor(d_k), "W_dec": factor(d_v), "bias": rand(d_k, d_v, scale=0.5)}
    if sae_type == "rank1":
        state |= {
            "encoder.weight": rand(N_F, d_k * d_v, scale=0.3),
            "encoder.bias": rand(N_F, scale=0.1),
            "V": factor(d_k),
            "W": factor(d_v),
            "bias": rand(d_k, d_v, scale=0.5),
        }
    if sae_type == "flat":
        state |= {
            "encoder.weight": rand(N_F, d_k * d_v, scale=0.3),
            "encoder.bias": rand(N_F, scale=0.1),
            "decoder.weight": rand(d_k * d_v, N_F, scale=0.3),
            "decoder.bias": rand(d_k * d_v, scale=0.5),
        }
    if sae_type == "bilinear_jumprelu":
        state["log_threshold"] = torch.log(torch.rand(N_F, generator=gen) * 0.5 + 0.01)
    config = {
        "sae_type": sae_type, "layer": 9, "head": 4, "n_features": N_F, "d_k": d_k, "d_v": d_v,
        "d_in": d_k * d_v, "k": K, "rank": rank, "use_batchtopk": use_batchtopk, "seed": 42,
        "lr": 3e-4, "code_sha": "abc123",
    }  # fmt: skip
    checkpoint = {"model_state_dict": state, "epoch": 19, "step": 320, "val_mse": 2.2e-5}
    checkpoint["config"] = config if with_config else {}
    return checkpoint


def states(n=24, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_K, D_V, generator=gen, dtype=torch.float64)


CASES = [
    pytest.param("bilinear", 1, False, ws.WriteTopKSAE, id="bilinear-topk"),
    pytest.param("bilinear", 2, False, ws.WriteTopKSAE, id="bilinear-rank2"),
    pytest.param("bilinear", 1, True, ImportedWriteBatchTopKSAE, id="bilinear-batchtopk"),
    pytest.param("bilinear_tied", 1, False, ws.WriteTopKSAE, id="bilinear_tied"),
    pytest.param("bilinear_jumprelu", 1, False, ws.WriteJumpReLUSAE, id="bilinear_jumprelu"),
    pytest.param("rank1", 1, False, ws.WriteTopKSAE, id="rank1-matrixsae"),
    pytest.param("rank1", 2, True, ImportedWriteBatchTopKSAE, id="rank1-r2-batchtopk"),
    pytest.param("flat", 1, False, TopKSAE, id="flat"),
    pytest.param("flat", 1, True, ImportedBatchTopKSAE, id="flat-batchtopk"),
]


@pytest.mark.parametrize("sae_type,rank,use_batchtopk,expected_class", CASES)
def test_import_reproduces_the_paper_forward(tmp_path, sae_type, rank, use_batchtopk, expected_class):
    checkpoint = make_paper_checkpoint(sae_type, rank=rank, use_batchtopk=use_batchtopk)
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    sae = ws.load_paper_checkpoint(path, dtype="float64", state_layout="key_first")
    assert type(sae) is expected_class
    X = states()
    expected_codes, expected_recon = paper_forward(checkpoint, X)
    flat_states = X.reshape(X.shape[0], -1)
    codes = sae.encode(flat_states)
    assert torch.equal(codes != 0, expected_codes != 0), "same active latents"
    torch.testing.assert_close(codes, expected_codes, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.decode(codes), expected_recon, rtol=1e-12, atol=1e-12)
    assert sae.cfg.apply_b_dec_to_input is False


def test_import_in_float32_matches_to_float32_precision():
    checkpoint = make_paper_checkpoint("bilinear")
    sae = convert(checkpoint)
    assert sae.W_dec_key.dtype == torch.float32
    X = states()
    expected_codes, expected_recon = paper_forward(checkpoint, X)
    codes = sae.encode(X.reshape(X.shape[0], -1).float())
    assert torch.equal(codes != 0, expected_codes != 0)
    torch.testing.assert_close(sae.decode(codes).double(), expected_recon, rtol=1e-5, atol=1e-5)


def test_factor_roles_are_mapped_key_and_value_side():
    checkpoint = make_paper_checkpoint("bilinear")
    sae = convert(checkpoint, dtype="float64")
    state = checkpoint["model_state_dict"]
    assert torch.equal(sae.W_dec_key, state["V_dec"].double())  # paper V_dec: key side [F,R,d_k]
    assert torch.equal(sae.W_dec_value, state["W_dec"].double())  # paper W_dec: value side
    assert torch.equal(sae.W_enc_key, state["V_enc"].double())
    assert torch.equal(sae.b_dec_matrix, state["bias"].double())


def test_old_two_dimensional_factors_are_upgraded():
    checkpoint = make_paper_checkpoint("bilinear", two_d=True)
    sae = convert(checkpoint, dtype="float64")
    assert sae.W_dec_key.shape == (N_F, 1, D_K)
    X = states()
    _, expected = paper_forward(checkpoint, X)
    torch.testing.assert_close(sae(X.reshape(X.shape[0], -1)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sae_type", ["bilinear", "bilinear_tied", "bilinear_jumprelu", "rank1", "flat"])
def test_sae_type_is_inferred_from_keys_when_config_lacks_it(sae_type):
    checkpoint = make_paper_checkpoint(sae_type)
    checkpoint["config"].pop("sae_type")
    sae = convert(checkpoint, dtype="float64")
    X = states()
    checkpoint["config"]["sae_type"] = sae_type
    _, expected = paper_forward(checkpoint, X)
    torch.testing.assert_close(sae(X.reshape(X.shape[0], -1)), expected, rtol=1e-12, atol=1e-12)


def test_tied_checkpoint_with_shared_encoder_keys_is_accepted():
    checkpoint = make_paper_checkpoint("bilinear_tied")
    state = checkpoint["model_state_dict"]
    state["V_enc"], state["W_enc"] = state["V_dec"], state["W_dec"]
    sae = convert(checkpoint)
    assert sae.cfg.tied
    state["W_enc"] = state["W_enc"] + 1.0
    with pytest.raises(ws.PaperCheckpointError, match="differs"):
        convert(make_paper_checkpoint("bilinear_tied") | {"model_state_dict": state})


def test_metadata_records_the_cell_and_the_paper_config(tmp_path):
    sae = convert(make_paper_checkpoint("bilinear"))
    assert sae.cfg.metadata.hook_name == "blocks.9.mixer.hook_state"
    assert sae.cfg.metadata.hook_head_index == 4
    assert sae.cfg.metadata.paper_checkpoint_config["code_sha"] == "abc123"
    sae.save_model(tmp_path / "imported")
    loaded = SAE.load_from_disk(tmp_path / "imported")
    x = states().reshape(24, -1).float()
    assert torch.equal(loaded(x), sae(x))
    assert loaded.cfg.apply_b_dec_to_input is False


def test_k_larger_than_n_features_is_clamped_like_the_paper():
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["k"] = 10 * N_F
    assert convert(checkpoint).cfg.k == N_F


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("not_a_checkpoint", [{"state_dict": {}}, [1, 2], torch.zeros(3)], ids=["dict", "list", "tensor"])
def test_not_a_checkpoint(not_a_checkpoint):
    with pytest.raises(ws.PaperCheckpointError, match="model_state_dict"):
        convert(not_a_checkpoint)


@pytest.mark.parametrize("sae_type", ["bilinear_gated", "bilinear_flat", "mystery"])
def test_unsupported_sae_type_names_found_and_supported(sae_type):
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["sae_type"] = sae_type
    with pytest.raises(ws.PaperCheckpointError) as error:
        convert(checkpoint)
    message = str(error.value)
    assert sae_type in message and "bilinear_tied" in message and "rank1" in message


def test_unrecognised_keys_without_config():
    checkpoint = {"model_state_dict": {"weird": torch.zeros(3)}, "config": {}}
    with pytest.raises(ws.PaperCheckpointError, match="weird"):
        convert(checkpoint)


def test_shape_mismatch_names_the_parameter():
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["d_k"], checkpoint["config"]["d_v"] = D_V, D_K  # swapped roles
    with pytest.raises(ws.PaperCheckpointError, match="V_enc"):
        convert(checkpoint)


def test_unknown_extra_parameter_is_refused():
    checkpoint = make_paper_checkpoint("rank1")
    checkpoint["model_state_dict"]["encoder.scale"] = torch.ones(1)
    with pytest.raises(ws.PaperCheckpointError, match="encoder.scale"):
        convert(checkpoint)


def test_missing_k_is_reported():
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"].pop("k")
    with pytest.raises(ws.PaperCheckpointError, match="'k'"):
        convert(checkpoint)


def test_file_with_arbitrary_pickles_needs_trust(tmp_path):
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["custom"] = _Opaque()
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ws.PaperCheckpointError, match="trust_pickle"):
        ws.load_paper_checkpoint(path, state_layout="key_first")
    assert type(ws.load_paper_checkpoint(path, trust_pickle=True, state_layout="key_first")) is ws.WriteTopKSAE


class _Opaque:
    pass


# ---- the Mamba-2 checkpoints' transposed layout (transformers' cache [head_dim, d_state]) --------
# make_paper_checkpoint's states are [D_K, D_V] in the checkpoint's own names; for a Mamba-2 checkpoint those are
# [head_dim, d_state], and hook_state holds their transpose.

LAYOUT_CASES = [
    pytest.param("bilinear", 1, False, id="bilinear"),
    pytest.param("bilinear", 2, True, id="bilinear-rank2-batchtopk"),
    pytest.param("bilinear_tied", 1, False, id="bilinear_tied"),
    pytest.param("bilinear_jumprelu", 1, False, id="bilinear_jumprelu"),
    pytest.param("rank1", 2, False, id="rank1-r2"),
    pytest.param("flat", 1, False, id="flat"),
]


@pytest.mark.parametrize("sae_type,rank,use_batchtopk", LAYOUT_CASES)
def test_head_dim_first_checkpoint_gives_the_paper_codes_on_hook_state(sae_type, rank, use_batchtopk):
    checkpoint = make_paper_checkpoint(sae_type, rank=rank, use_batchtopk=use_batchtopk)
    sae = convert(checkpoint, dtype="float64", state_layout="head_dim_first")
    authors_states = states()  # [n, head_dim, d_state], as the authors extracted them
    expected_codes, expected_recon = paper_forward(checkpoint, authors_states)
    ours = authors_states.transpose(1, 2).reshape(len(authors_states), -1)  # hook_state: [d_state, head_dim]
    codes = sae.encode(ours)
    assert torch.equal(codes != 0, expected_codes != 0)
    torch.testing.assert_close(codes, expected_codes, rtol=1e-12, atol=1e-12)
    expected_ours = expected_recon.reshape(-1, D_K, D_V).transpose(1, 2).reshape(len(ours), -1)
    torch.testing.assert_close(sae.decode(codes), expected_ours, rtol=1e-12, atol=1e-12)
    if hasattr(sae.cfg, "d_k"):
        assert (sae.cfg.d_k, sae.cfg.d_v) == (D_V, D_K)
    assert sae.cfg.metadata.paper_state_layout == "head_dim_first"


def test_head_dim_first_swaps_the_factor_roles():
    checkpoint = make_paper_checkpoint("bilinear")
    state = checkpoint["model_state_dict"]
    sae = convert(checkpoint, dtype="float64", state_layout="head_dim_first")
    assert torch.equal(sae.W_dec_key, state["W_dec"].double())  # the d_state side is our key side
    assert torch.equal(sae.W_dec_value, state["V_dec"].double())
    assert torch.equal(sae.W_enc_key, state["W_enc"].double())
    assert torch.equal(sae.b_dec_matrix, state["bias"].double().T)


def test_the_key_first_import_of_a_transposed_checkpoint_gives_other_codes():
    """What happened before the layout option: d_in is the same either way, so hook_state's (transposed) states run
    through a key-first import without any error, and give codes that are not the paper's."""
    checkpoint = make_paper_checkpoint("bilinear")
    authors_states = states()
    expected_codes, _ = paper_forward(checkpoint, authors_states)
    ours = authors_states.transpose(1, 2).reshape(len(authors_states), -1)
    wrong = convert(checkpoint, dtype="float64").encode(ours)
    assert not torch.allclose(wrong, expected_codes)
    right = convert(checkpoint, dtype="float64", state_layout="head_dim_first").encode(ours)
    torch.testing.assert_close(right, expected_codes, rtol=1e-12, atol=1e-12)


def test_mamba2_checkpoint_on_transformers_cache_matches_hooked_state(mamba2_pair):
    """End to end: an SAE in the authors' layout, fed transformers' Mamba-2 cache as the authors did, and the imported
    SAE fed HookedMamba2's hook_state, give the same codes."""
    hf_model, model = mamba2_pair
    cfg = model.cfg
    layer, head = 1, 3
    checkpoint = make_paper_checkpoint("bilinear", seed=5)
    n_f = 16
    gen = torch.Generator().manual_seed(1)
    state = checkpoint["model_state_dict"]
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    state |= {"V_enc": unit(n_f, 1, cfg.d_v), "W_enc": unit(n_f, 1, cfg.d_k), "V_dec": unit(n_f, 1, cfg.d_v),
              "W_dec": unit(n_f, 1, cfg.d_k), "bias": 0.01 * torch.randn(cfg.d_v, cfg.d_k, generator=gen)}
    checkpoint["config"] |= {"d_k": cfg.d_v, "d_v": cfg.d_k, "d_in": cfg.d_k * cfg.d_v, "layer": layer, "head": head}
    tokens = torch.randint(0, cfg.d_vocab, (2, 9), generator=gen)
    with torch.no_grad():
        out = hf_model(tokens, use_cache=True)
        hf_states = out.cache.get_recurrent_state(layer)[:, head].double()  # [batch, head_dim, d_state]
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_state")
    ours = cache[f"blocks.{layer}.mixer.hook_state"][:, -1, head].double()  # [batch, d_state * head_dim]
    expected_codes, _ = paper_forward(checkpoint, hf_states)
    sae = convert(checkpoint, dtype="float64", state_layout="head_dim_first")
    assert (sae.cfg.d_k, sae.cfg.d_v) == (cfg.d_k, cfg.d_v)
    torch.testing.assert_close(sae.encode(ours), expected_codes, rtol=1e-5, atol=1e-5)


def test_unknown_state_layout_is_refused():
    with pytest.raises(ws.PaperCheckpointError, match="head_dim_first"):
        convert(make_paper_checkpoint("bilinear"), state_layout="transposed")


# ---- state_layout="auto" (the default): decided from the model, the config, or the authors' runs --------------------
# The authors' training code records sae_type, layer, head, n_features, d_k, d_v, d_in, k, rank, use_batchtopk, seed,
# lr, lr_min, batch_size, epochs, ... but no model name; their Mamba-2 runs are [head_dim 64, d_state 128] states
# trained with batch 128 for 50 epochs, their Gated DeltaNet runs [128, 128] with batch 256 for 20 epochs.


def authors_checkpoint(d_k, d_v, batch_size, epochs, sae_type="bilinear", n=6):
    checkpoint = make_paper_checkpoint(sae_type, d_k=d_k, d_v=d_v, seed=2)
    checkpoint["config"] |= {"batch_size": batch_size, "epochs": epochs, "lr_min": 3e-5}
    gen = torch.Generator().manual_seed(4)
    return checkpoint, torch.randn(n, d_k, d_v, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("sae_type", ["bilinear", "rank1", "flat"])
def test_auto_converts_an_authors_mamba2_checkpoint(sae_type):
    checkpoint, authors_states = authors_checkpoint(64, 128, batch_size=128, epochs=50, sae_type=sae_type)
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64")  # no state_layout: "auto"
    assert sae.cfg.metadata.paper_state_layout == "head_dim_first"
    assert "Mamba-2" in sae.cfg.metadata.paper_state_layout_reason
    expected_codes, _ = paper_forward(checkpoint, authors_states)
    ours = authors_states.transpose(1, 2).reshape(len(authors_states), -1)  # hook_state: [d_state, head_dim]
    torch.testing.assert_close(sae.encode(ours), expected_codes, rtol=1e-12, atol=1e-12)


def test_auto_keeps_an_authors_gated_deltanet_checkpoint():
    checkpoint, authors_states = authors_checkpoint(128, 128, batch_size=256, epochs=20)
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64")
    assert sae.cfg.metadata.paper_state_layout == "key_first"
    assert "Gated DeltaNet" in sae.cfg.metadata.paper_state_layout_reason
    expected_codes, _ = paper_forward(checkpoint, authors_states)
    torch.testing.assert_close(sae.encode(authors_states.reshape(len(authors_states), -1)), expected_codes,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "d_k,d_v,batch_size,epochs",
    [
        pytest.param(D_K, D_V, None, None, id="unknown-shape"),
        pytest.param(128, 128, 128, 50, id="square-with-the-mamba2-recipe"),
        pytest.param(64, 128, 256, 20, id="mamba2-shape-with-the-gdn-recipe"),
    ],
)
def test_auto_refuses_when_it_cannot_tell(d_k, d_v, batch_size, epochs):
    checkpoint = make_paper_checkpoint("bilinear", d_k=d_k, d_v=d_v)
    for key, value in (("batch_size", batch_size), ("epochs", epochs)):
        if value is not None:
            checkpoint["config"][key] = value
    with pytest.raises(ws.PaperCheckpointError) as error:
        ws.convert_paper_checkpoint(checkpoint)
    message = str(error.value)
    assert "state_layout='head_dim_first'" in message and "state_layout='key_first'" in message
    assert "model=" in message and "Cannot tell" in message
    # the explicit layouts still work
    assert convert(checkpoint, state_layout="head_dim_first").cfg.metadata.paper_state_layout == "head_dim_first"
    assert convert(checkpoint).cfg.metadata.paper_state_layout == "key_first"


def test_auto_refusal_reaches_load_paper_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    torch.save(make_paper_checkpoint("bilinear"), path)
    with pytest.raises(ws.PaperCheckpointError, match="Cannot tell"):
        ws.load_paper_checkpoint(path)


@pytest.mark.parametrize(
    "name,layout",
    [("AntonV/mamba2-780m-hf", "head_dim_first"), ("Qwen/Qwen3.5-0.8B", "key_first"), ("fla-hub/gla-1.3B", "key_first")],
)
def test_auto_reads_a_model_family_named_in_the_config(name, layout):
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["model_name"] = name
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64")
    assert sae.cfg.metadata.paper_state_layout == layout
    assert name in sae.cfg.metadata.paper_state_layout_reason


def test_a_config_naming_both_layouts_is_refused():
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"] |= {"model_name": "mamba2-780m", "architecture": "Qwen3_5ForCausalLM"}
    with pytest.raises(ws.PaperCheckpointError, match="both layouts"):
        ws.convert_paper_checkpoint(checkpoint)


def model_shaped_checkpoint(model, layer, head, layout, sae_type="bilinear"):
    """A checkpoint for one head of ``model`` in the authors' layout for it (key-first, or [head_dim, d_state] =
    [d_v, d_k] in our names)."""
    d_k, d_v = (model.cfg.d_k, model.cfg.d_v) if layout == "key_first" else (model.cfg.d_v, model.cfg.d_k)
    checkpoint = make_paper_checkpoint(sae_type, d_k=d_k, d_v=d_v, seed=7)
    checkpoint["config"] |= {"layer": layer, "head": head}
    return checkpoint


def test_auto_with_a_mamba2_model_gives_the_authors_codes_on_hook_state(mamba2_pair):
    """The end-to-end check above, with the layout decided by model=HookedMamba2 instead of given."""
    hf_model, model = mamba2_pair
    layer, head = 1, 3
    checkpoint = model_shaped_checkpoint(model, layer, head, "head_dim_first")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_states = hf_model(tokens, use_cache=True).cache.get_recurrent_state(layer)[:, head].double()
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_state")
    ours = cache[f"blocks.{layer}.mixer.hook_state"][:, -1, head].double()
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64", model=model)
    assert sae.cfg.metadata.paper_state_layout == "head_dim_first"
    assert "HookedMamba2" in sae.cfg.metadata.paper_state_layout_reason
    expected_codes, _ = paper_forward(checkpoint, hf_states)
    torch.testing.assert_close(sae.encode(ours), expected_codes, rtol=1e-5, atol=1e-5)


def test_auto_with_a_qwen35_model_is_key_first(qwen35_pair):
    _, model = qwen35_pair
    checkpoint = model_shaped_checkpoint(model, 1, 2, "key_first")
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64", model=model)
    assert sae.cfg.metadata.paper_state_layout == "key_first"
    assert (sae.cfg.d_k, sae.cfg.d_v) == (model.cfg.d_k, model.cfg.d_v)
    assert "HookedQwen35" in sae.cfg.metadata.paper_state_layout_reason


def test_the_model_is_checked_after_conversion(mamba2_pair, qwen35_pair):
    _, mamba2 = mamba2_pair
    _, qwen35 = qwen35_pair
    # a Mamba-2 checkpoint forced through the wrong layout no longer fits the model, and the error says why
    checkpoint = model_shaped_checkpoint(mamba2, 1, 3, "head_dim_first")
    with pytest.raises(ws.PaperCheckpointError, match="transposed shape would fit"):
        ws.convert_paper_checkpoint(checkpoint, state_layout="key_first", model=mamba2)
    # another model's checkpoint
    with pytest.raises(ws.PaperCheckpointError, match="another model"):
        ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear"), model=qwen35)
    # a layer that is not recurrent (the last of the GQA Qwen3.5 is full attention), a head out of range
    attention_layer = qwen35.cfg.attention_layers[0]
    with pytest.raises(ws.PaperCheckpointError, match="not a recurrent layer"):
        ws.convert_paper_checkpoint(model_shaped_checkpoint(qwen35, attention_layer, 0, "key_first"), model=qwen35)
    with pytest.raises(ws.PaperCheckpointError, match="has heads"):
        ws.convert_paper_checkpoint(model_shaped_checkpoint(qwen35, 1, qwen35.cfg.n_heads, "key_first"), model=qwen35)


def test_a_config_family_contradicting_the_model_is_refused(qwen35_pair):
    _, model = qwen35_pair
    checkpoint = model_shaped_checkpoint(model, 1, 0, "key_first")
    checkpoint["config"]["model_name"] = "AntonV/mamba2-780m-hf"
    with pytest.raises(ws.PaperCheckpointError, match="another model"):
        ws.convert_paper_checkpoint(checkpoint, model=model)


def test_model_must_be_a_hooked_model():
    with pytest.raises(ws.PaperCheckpointError, match="hooked model"):
        ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear"), model=torch.nn.Linear(2, 2))


# ---- BatchTopK: no inference threshold in the paper's checkpoints --------------------------------


def batchtopk_states(n=512, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_K * D_V, generator=gen)


@pytest.mark.parametrize("sae_type", ["bilinear", "flat"])
def test_imported_batchtopk_refuses_an_inference_save_without_a_threshold(tmp_path, sae_type):
    sae = convert(make_paper_checkpoint(sae_type, use_batchtopk=True))
    with pytest.raises(ws.PaperCheckpointError, match="estimate_batchtopk_threshold_"):
        sae.save_inference_model(tmp_path / "inference")
    assert not (tmp_path / "inference").exists() or not any((tmp_path / "inference").iterdir())


@pytest.mark.parametrize("sae_type", ["bilinear", "flat"])
def test_estimated_threshold_gives_an_inference_sae_firing_about_k(tmp_path, sae_type):
    sae = convert(make_paper_checkpoint(sae_type, use_batchtopk=True))
    X = batchtopk_states()
    threshold = estimate_batchtopk_threshold_(sae, X, batch_size=64)
    # the estimate is the mean over batches of the smallest active value of each batch
    with torch.no_grad():
        per_batch = [sae.encode(X[i : i + 64]) for i in range(0, 512, 64)]
    expected = torch.stack([c[c > 0].min().double() for c in per_batch]).mean()
    assert threshold == pytest.approx(float(expected), rel=1e-6)
    sae.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert "jumprelu" in inference.cfg.architecture()
    held_out = batchtopk_states(seed=8)
    l0 = (inference.encode(held_out) != 0).float().sum(-1).mean().item()
    assert 0.5 * K <= l0 <= 1.6 * K, l0
    # what the unestimated threshold (0) gave: every positive pre-activation fires
    zero_l0 = (sae.encode(held_out) != 0).sum().item() / len(held_out)  # batch-relative: exactly K
    assert zero_l0 == pytest.approx(K)
    all_positive = (held_out @ inference.W_enc + inference.b_enc > 0).float().sum(-1).mean().item()
    assert all_positive > 2 * l0


def test_threshold_estimate_errors():
    sae = convert(make_paper_checkpoint("bilinear", use_batchtopk=True))
    with pytest.raises(ws.PaperCheckpointError, match="at least one batch"):
        estimate_batchtopk_threshold_(sae, batchtopk_states(n=10), batch_size=64)
    with pytest.raises(ws.PaperCheckpointError, match="d_in"):
        estimate_batchtopk_threshold_(sae, torch.zeros(64, 5), batch_size=64)
    topk = convert(make_paper_checkpoint("bilinear"))
    with pytest.raises(ws.PaperCheckpointError, match="not a BatchTopK"):
        estimate_batchtopk_threshold_(topk, batchtopk_states(), batch_size=64)
