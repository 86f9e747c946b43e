"""scripts/train_models.py: a run paused with --stop-at and continued with --resume ends with the same weights as the
same run made in one go (same batches, schedule and optimizer moments), and the reference decay initialisation gives
Gated DeltaNet heads the per-token decays it promises. Needs the corpus (scripts/build_corpus.py) for the run test."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
needs_corpus = pytest.mark.skipif(not (train_models.CORPUS / "train.txt").exists(),
                                  reason="needs the corpus: scripts/build_corpus.py")


def test_reference_decay_init_spreads_the_decays_as_promised():
    from transformers import AutoModelForCausalLM

    config = train_models.make_config("qwen35", 64, 0, 0, 1)
    model = AutoModelForCausalLM.from_config(config)
    train_models.reference_decay_init(model, torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        mixer = getattr(layer, "linear_attn", None)
        if mixer is None:
            continue
        dt = torch.nn.functional.softplus(mixer.dt_bias.double())
        assert ((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6))).all()
        a = mixer.A_log.double().exp()
        assert ((a >= 0.01 * (1 - 1e-6)) & (a <= 16 * (1 + 1e-6))).all()
    # transformers' own init (dt_bias = 1) keeps under exp(-1.31 A) per token: below 0.27 for most heads.
    decays = torch.cat([torch.exp(-m.A_log.double().exp() * torch.nn.functional.softplus(m.dt_bias.double()))
                        for m in model.modules() if hasattr(m, "dt_bias")])
    assert float(decays.median()) > 0.5


@needs_corpus
def test_paused_and_resumed_run_equals_one_run(tmp_path):
    from safetensors.torch import load_file

    common = ["--family", "qwen35", "--steps", "4", "--eval-every", "2", "--ctx", "16", "--batch", "2",
              "--eval-blocks", "2", "--warmup", "2"]
    train_models.main([*common, "--out", str(tmp_path / "one")])
    train_models.main([*common, "--out", str(tmp_path / "two"), "--stop-at", "3"])
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["step"] == 3
    with pytest.raises(SystemExit, match="already holds a run"):
        train_models.main([*common, "--out", str(tmp_path / "two")])
    train_models.main(["--family", "qwen35", "--resume", "--out", str(tmp_path / "two")])
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=0, msg=name)
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["log"]["resumed_at"] == [3]


def test_rwkv7_names_round_trip_through_the_adapters_table():
    from rwkv7_training import build_rwkv7, fla_name, rwkv7_config

    from writesae_lens.adapters.rwkv7.weights import our_name

    model = build_rwkv7(rwkv7_config(64, 0, 0, 1), None, torch.Generator().manual_seed(0))
    names = list(model.state_dict())
    assert [our_name(fla_name(n)) for n in names] == names
    assert len({fla_name(n) for n in names}) == len(names)
    # The initial decays spread from long to medium memory, as the docstring of rwkv7_training promises.
    w0 = model.blocks[0].mixer.w_lora.lora[2].bias.double()
    retention = torch.exp(-math.exp(-0.5) * torch.sigmoid(w0))
    assert float(retention.max()) > 0.998 and 0.85 < float(retention.min()) < 0.95


@needs_corpus
def test_rwkv7_run_saves_an_fla_folder_that_loads_back(tmp_path):
    from writesae_lens.models import load_hooked_model

    train_models.main(["--family", "rwkv7", "--steps", "2", "--eval-every", "2", "--ctx", "16", "--batch", "2",
                       "--eval-blocks", "2", "--warmup", "1", "--out", str(tmp_path / "rwkv7")])
    trained = torch.load(tmp_path / "rwkv7" / "checkpoint.pt", weights_only=False)["model"]
    loaded = load_hooked_model(tmp_path / "rwkv7")
    assert type(loaded).__name__ == "HookedRWKV7" and loaded.tokenizer is not None
    state = loaded.state_dict()
    assert state.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert torch.isfinite(loaded(torch.tensor([[0, 5, 7, 9]]))).all()


@needs_corpus
def test_sigterm_ends_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    import os
    import signal

    calls = []
    forward = train_models.logits_of

    def forward_then_terminate(model, ids):
        calls.append(1)
        if len(calls) == 2 and model.training:  # during the second training step
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(model, ids)

    monkeypatch.setattr(train_models, "logits_of", forward_then_terminate)
    before = signal.getsignal(signal.SIGTERM)
    train_models.main(["--family", "qwen35", "--steps", "6", "--eval-every", "5", "--ctx", "16", "--batch", "2",
                       "--eval-blocks", "2", "--warmup", "1", "--out", str(tmp_path / "run")])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and checkpoint["log"]["finished"] is False
    assert checkpoint["log"]["heldout_loss"] == []  # saved at once, without the held-out pass
    assert signal.getsignal(signal.SIGTERM) is before
