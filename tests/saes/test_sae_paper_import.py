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


def make_paper_checkpoint(sae_type, rank=1, use_batchtopk=False, two_d=False, seed=0, with_config=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    def factor(d):
        f = torch.nn.functional.normalize(rand(N_F, rank, d), dim=-1)
        return f[:, 0] if two_d else f

    state: dict[str, torch.Tensor] = {"steps_since_active": torch.zeros(N_F)}
    if sae_type in ("bilinear", "bilinear_jumprelu"):
        state |= {"V_enc": factor(D_K), "W_enc": factor(D_V), "b_enc": rand(N_F, scale=0.1)}
    if sae_type == "bilinear_tied":
        state["b_enc"] = rand(N_F, scale=0.1)
    if sae_type in ("bilinear", "bilinear_jumprelu", "bilinear_tied"):
        state |= {"V_dec": factor(D_K), "W_dec": factor(D_V), "bias": rand(D_K, D_V, scale=0.5)}
    if sae_type == "rank1":
        state |= {
            "encoder.weight": rand(N_F, D_K * D_V, scale=0.3),
            "encoder.bias": rand(N_F, scale=0.1),
            "V": factor(D_K),
            "W": factor(D_V),
            "bias": rand(D_K, D_V, scale=0.5),
        }
    if sae_type == "flat":
        state |= {
            "encoder.weight": rand(N_F, D_K * D_V, scale=0.3),
            "encoder.bias": rand(N_F, scale=0.1),
            "decoder.weight": rand(D_K * D_V, N_F, scale=0.3),
            "decoder.bias": rand(D_K * D_V, scale=0.5),
        }
    if sae_type == "bilinear_jumprelu":
        state["log_threshold"] = torch.log(torch.rand(N_F, generator=gen) * 0.5 + 0.01)
    config = {
        "sae_type": sae_type, "layer": 9, "head": 4, "n_features": N_F, "d_k": D_K, "d_v": D_V,
        "d_in": D_K * D_V, "k": K, "rank": rank, "use_batchtopk": use_batchtopk, "seed": 42,
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
    sae = ws.load_paper_checkpoint(path, dtype="float64")
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
    sae = ws.convert_paper_checkpoint(checkpoint)
    assert sae.W_dec_key.dtype == torch.float32
    X = states()
    expected_codes, expected_recon = paper_forward(checkpoint, X)
    codes = sae.encode(X.reshape(X.shape[0], -1).float())
    assert torch.equal(codes != 0, expected_codes != 0)
    torch.testing.assert_close(sae.decode(codes).double(), expected_recon, rtol=1e-5, atol=1e-5)


def test_factor_roles_are_mapped_key_and_value_side():
    checkpoint = make_paper_checkpoint("bilinear")
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64")
    state = checkpoint["model_state_dict"]
    assert torch.equal(sae.W_dec_key, state["V_dec"].double())  # paper V_dec: key side [F,R,d_k]
    assert torch.equal(sae.W_dec_value, state["W_dec"].double())  # paper W_dec: value side
    assert torch.equal(sae.W_enc_key, state["V_enc"].double())
    assert torch.equal(sae.b_dec_matrix, state["bias"].double())


def test_old_two_dimensional_factors_are_upgraded():
    checkpoint = make_paper_checkpoint("bilinear", two_d=True)
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64")
    assert sae.W_dec_key.shape == (N_F, 1, D_K)
    X = states()
    _, expected = paper_forward(checkpoint, X)
    torch.testing.assert_close(sae(X.reshape(X.shape[0], -1)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sae_type", ["bilinear", "bilinear_tied", "bilinear_jumprelu", "rank1", "flat"])
def test_sae_type_is_inferred_from_keys_when_config_lacks_it(sae_type):
    checkpoint = make_paper_checkpoint(sae_type)
    checkpoint["config"].pop("sae_type")
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64")
    X = states()
    checkpoint["config"]["sae_type"] = sae_type
    _, expected = paper_forward(checkpoint, X)
    torch.testing.assert_close(sae(X.reshape(X.shape[0], -1)), expected, rtol=1e-12, atol=1e-12)


def test_tied_checkpoint_with_shared_encoder_keys_is_accepted():
    checkpoint = make_paper_checkpoint("bilinear_tied")
    state = checkpoint["model_state_dict"]
    state["V_enc"], state["W_enc"] = state["V_dec"], state["W_dec"]
    sae = ws.convert_paper_checkpoint(checkpoint)
    assert sae.cfg.tied
    state["W_enc"] = state["W_enc"] + 1.0
    with pytest.raises(ws.PaperCheckpointError, match="differs"):
        ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear_tied") | {"model_state_dict": state})


def test_metadata_records_the_cell_and_the_paper_config(tmp_path):
    sae = ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear"))
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
    assert ws.convert_paper_checkpoint(checkpoint).cfg.k == N_F


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("not_a_checkpoint", [{"state_dict": {}}, [1, 2], torch.zeros(3)], ids=["dict", "list", "tensor"])
def test_not_a_checkpoint(not_a_checkpoint):
    with pytest.raises(ws.PaperCheckpointError, match="model_state_dict"):
        ws.convert_paper_checkpoint(not_a_checkpoint)


@pytest.mark.parametrize("sae_type", ["bilinear_gated", "bilinear_flat", "mystery"])
def test_unsupported_sae_type_names_found_and_supported(sae_type):
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["sae_type"] = sae_type
    with pytest.raises(ws.PaperCheckpointError) as error:
        ws.convert_paper_checkpoint(checkpoint)
    message = str(error.value)
    assert sae_type in message and "bilinear_tied" in message and "rank1" in message


def test_unrecognised_keys_without_config():
    checkpoint = {"model_state_dict": {"weird": torch.zeros(3)}, "config": {}}
    with pytest.raises(ws.PaperCheckpointError, match="weird"):
        ws.convert_paper_checkpoint(checkpoint)


def test_shape_mismatch_names_the_parameter():
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["d_k"], checkpoint["config"]["d_v"] = D_V, D_K  # swapped roles
    with pytest.raises(ws.PaperCheckpointError, match="V_enc"):
        ws.convert_paper_checkpoint(checkpoint)


def test_unknown_extra_parameter_is_refused():
    checkpoint = make_paper_checkpoint("rank1")
    checkpoint["model_state_dict"]["encoder.scale"] = torch.ones(1)
    with pytest.raises(ws.PaperCheckpointError, match="encoder.scale"):
        ws.convert_paper_checkpoint(checkpoint)


def test_missing_k_is_reported():
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"].pop("k")
    with pytest.raises(ws.PaperCheckpointError, match="'k'"):
        ws.convert_paper_checkpoint(checkpoint)


def test_file_with_arbitrary_pickles_needs_trust(tmp_path):
    checkpoint = make_paper_checkpoint("bilinear")
    checkpoint["config"]["custom"] = _Opaque()
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ws.PaperCheckpointError, match="trust_pickle"):
        ws.load_paper_checkpoint(path)
    assert type(ws.load_paper_checkpoint(path, trust_pickle=True)) is ws.WriteTopKSAE


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
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64", state_layout="head_dim_first")
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
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64", state_layout="head_dim_first")
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
    wrong = ws.convert_paper_checkpoint(checkpoint, dtype="float64").encode(ours)
    assert not torch.allclose(wrong, expected_codes)
    right = ws.convert_paper_checkpoint(checkpoint, dtype="float64", state_layout="head_dim_first").encode(ours)
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
    sae = ws.convert_paper_checkpoint(checkpoint, dtype="float64", state_layout="head_dim_first")
    assert (sae.cfg.d_k, sae.cfg.d_v) == (cfg.d_k, cfg.d_v)
    torch.testing.assert_close(sae.encode(ours), expected_codes, rtol=1e-5, atol=1e-5)


def test_unknown_state_layout_is_refused():
    with pytest.raises(ws.PaperCheckpointError, match="head_dim_first"):
        ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear"), state_layout="transposed")


# ---- BatchTopK: no inference threshold in the paper's checkpoints --------------------------------


def batchtopk_states(n=512, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_K * D_V, generator=gen)


@pytest.mark.parametrize("sae_type", ["bilinear", "flat"])
def test_imported_batchtopk_refuses_an_inference_save_without_a_threshold(tmp_path, sae_type):
    sae = ws.convert_paper_checkpoint(make_paper_checkpoint(sae_type, use_batchtopk=True))
    with pytest.raises(ws.PaperCheckpointError, match="estimate_batchtopk_threshold_"):
        sae.save_inference_model(tmp_path / "inference")
    assert not (tmp_path / "inference").exists() or not any((tmp_path / "inference").iterdir())


@pytest.mark.parametrize("sae_type", ["bilinear", "flat"])
def test_estimated_threshold_gives_an_inference_sae_firing_about_k(tmp_path, sae_type):
    sae = ws.convert_paper_checkpoint(make_paper_checkpoint(sae_type, use_batchtopk=True))
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
    sae = ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear", use_batchtopk=True))
    with pytest.raises(ws.PaperCheckpointError, match="at least one batch"):
        estimate_batchtopk_threshold_(sae, batchtopk_states(n=10), batch_size=64)
    with pytest.raises(ws.PaperCheckpointError, match="d_in"):
        estimate_batchtopk_threshold_(sae, torch.zeros(64, 5), batch_size=64)
    topk = ws.convert_paper_checkpoint(make_paper_checkpoint("bilinear"))
    with pytest.raises(ws.PaperCheckpointError, match="not a BatchTopK"):
        estimate_batchtopk_threshold_(topk, batchtopk_states(), batch_size=64)
