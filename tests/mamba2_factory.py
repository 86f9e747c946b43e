"""Tiny random Mamba-2 checkpoints for the tests: built with transformers, saved with save_pretrained.

The fixtures live here (not in conftest.py) and are imported by the ``test_mamba2_*`` modules; a process-wide memo
builds each checkpoint once per test session even though each module gets its own fixture instance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# Named configurations. d_state != head_dim shows axis mistakes; several heads per group show broadcasting mistakes.
CONFIGS = {
    # 8 heads of 12 in 2 groups (4 heads per group), d_state 8; transformers' defaults otherwise.
    "grouped_nonsquare": dict(
        hidden_size=48, expand=2, num_heads=8, head_dim=12, n_groups=2, state_size=8, num_hidden_layers=3,
        conv_kernel=4,
    ),
    # One group for all heads, biases everywhere, a time_step_limit that clamps, tied embeddings, fp16-style residual.
    "biased_clamped_tied": dict(
        hidden_size=40, expand=2, num_heads=4, head_dim=20, n_groups=1, state_size=16, num_hidden_layers=2,
        conv_kernel=3, use_bias=True, time_step_limit=(0.3, 1.2), tie_word_embeddings=True, residual_in_fp32=False,
    ),
    # One head per group, d_state > head_dim, no conv bias.
    "head_per_group": dict(
        hidden_size=32, expand=1, num_heads=4, head_dim=8, n_groups=4, state_size=24, num_hidden_layers=2,
        conv_kernel=4, use_conv_bias=False,
    ),
}
VOCAB = 101
_BUILT: dict[str, Path] = {}


def hf_config(name: str, vocab_size: int = VOCAB):
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=vocab_size, chunk_size=64, eos_token_id=vocab_size - 1, pad_token_id=0,
                        bos_token_id=None, **CONFIGS[name])


def randomise(model, seed: int) -> None:
    """Move every parameter off its structured init (norm weights 1, D 1, conv bias 0, ...) so that no term hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=generator) * 1.5 + 0.05))  # A in [-1.55, -0.05]
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(noise * p.shape[1] ** -0.5)  # unit-scale activations: every path matters to the output
            elif p.dim() == 3:  # depthwise conv kernels
                p.copy_(noise * 0.5)
            else:  # dt_bias, D, biases, embeddings
                p.copy_(noise)


def build_checkpoint(name: str, folder: Path, seed: int = 0, vocab_size: int = VOCAB) -> Path:
    from transformers import Mamba2ForCausalLM

    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(hf_config(name, vocab_size)).eval()
    randomise(model, seed)
    model.save_pretrained(folder)
    return folder


def build_checkpoint_with_tokenizer(folder: Path, seed: int = 0) -> Path:
    """The "head_per_group" shape with the project's 4096-token test tokenizer copied in."""
    tokenizer_dir = Path(__file__).resolve().parents[1] / "writesae_lens" / "data" / "tokenizer"
    build_checkpoint("head_per_group", folder, seed=seed, vocab_size=4096)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / file, folder / file)
    return folder


@pytest.fixture(scope="session")
def mamba2_folders(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random checkpoint per named configuration."""
    for i, name in enumerate(CONFIGS):
        if name not in _BUILT:
            _BUILT[name] = build_checkpoint(name, tmp_path_factory.mktemp("mamba2") / name, seed=i)
    return dict(_BUILT)


@pytest.fixture(scope="session")
def mamba2_pair(mamba2_folders):
    """(transformers model, HookedMamba2) on the grouped, non-square weights."""
    from transformers import Mamba2ForCausalLM

    from writesae_lens.adapters.mamba2 import HookedMamba2

    folder = mamba2_folders["grouped_nonsquare"]
    return Mamba2ForCausalLM.from_pretrained(folder).eval(), HookedMamba2.from_pretrained(folder).eval()
