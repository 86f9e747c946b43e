"""A rank-2 WriteSAE trained by SAELens' own runner on one head of RWKV-7's ``hook_state``, on the non-square golden
fixture's checkpoint (random fla weights, d_k = 16, d_v = 32) fed random token ids."""

from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE

import writesae_lens.saes as ws
from sae_checks import runner_config, train_and_compare
from writesae_lens.adapters.rwkv7 import HookedRWKV7
from writesae_lens.evaluation.sae_evals import evaluate_state_sae
from writesae_lens.saes import factored

CHECKPOINT = Path(__file__).parent / "fixtures" / "rwkv7_nonsquare" / "checkpoint"
LAYER, HEAD, CONTEXT, RANK = 1, 2, 32, 2
HOOK = f"blocks.{LAYER}.mixer.hook_state"


@pytest.fixture(scope="module")
def model():
    if not (CHECKPOINT / "config.json").exists():
        pytest.skip("no non-square RWKV-7 fixture: run scripts/make_rwkv7_fixture.py --fixture nonsquare")
    return HookedRWKV7.from_pretrained(CHECKPOINT, device="cpu").eval()


def random_tokens(model, n_rows, seed):  # the fixture has no tokenizer
    return torch.randint(0, model.cfg.d_vocab, (n_rows, CONTEXT), generator=torch.Generator().manual_seed(seed))


def test_rank2_runner_on_rwkv7_nonsquare_heads(model, tmp_path):
    cfg = model.cfg
    assert cfg.d_k != cfg.d_v
    sae_cfg = ws.WriteTopKTrainingSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=64, d_k=cfg.d_k, d_v=cfg.d_v, k=4, rank=RANK)
    runner_cfg = runner_config(sae_cfg, HOOK, HEAD, CONTEXT, batch_prompts=8, steps=150, output=tmp_path / "sae",
                               model_name="rwkv7-nonsquare-fixture", dataset_path="local-random-tokens",
                               is_dataset_tokenized=True, n_batches_in_buffer=8, dead_feature_window=50,
                               feature_sampling_window=100)
    # 512 tokens, seen many times: a random model fed random tokens has little that carries over to unseen text, so
    # the variance is measured on the training states (the test is about the runner, factors and saving on RWKV-7)
    tokens = random_tokens(model, 16, seed=0)
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    states = cache[HOOK][:, :, HEAD].flatten(0, 1)  # [n, d_k * d_v]

    sae, before, after = train_and_compare(sae_cfg, runner_cfg, model, dataset, states)
    assert after > before + 0.3, (before, after)

    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, ws.WriteTopKSAE) and loaded.cfg.rank == RANK
    assert loaded.cfg.metadata.hook_name == HOOK and loaded.cfg.metadata.hook_head_index == HEAD
    saved = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(states)), sae.decode(sae.encode(states)))

    assert loaded.W_dec_key.shape == (64, RANK, cfg.d_k) and loaded.W_dec_value.shape == (64, RANK, cfg.d_v)
    singular = torch.linalg.svdvals(factored.materialize_atoms(loaded.W_dec_key, loaded.W_dec_value).double())
    assert singular.shape == (64, min(cfg.d_k, cfg.d_v))
    assert (singular[:, RANK:] <= 1e-5 * singular[:, :1]).all()  # every atom has rank <= 2 ...
    assert (singular[:, RANK - 1] > 1e-2 * singular[:, 0]).float().mean() > 0.5  # ... and most use both factors

    metrics = evaluate_state_sae(model, loaded, tokens)  # the head-aware splice runs on RWKV-7's state edits
    assert abs(metrics["explained_variance"] - after) < 0.05  # per-batch means there
    assert 0 < metrics["l0"] <= 4
    assert metrics["kl_div_spliced"] < metrics["kl_div_zero"]
