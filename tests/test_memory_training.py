"""scripts/train_models.py: a run paused with --stop-at and continued with --resume ends with the same weights as the
same run made in one go (same batches, schedule and optimizer moments), and the reference decay initialisation gives
Gated DeltaNet heads the per-token decays it promises. Needs the corpus (scripts/build_corpus.py) for the run test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.skipif(not (train_models.CORPUS / "train.txt").exists(), reason="needs the corpus: scripts/build_corpus.py")
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
