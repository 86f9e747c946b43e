"""Tiny random Mamba-2 checkpoints for the tests: built with transformers, saved with save_pretrained.

The session fixtures that use these builders are in conftest.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qwen35_factory import randomise as randomise_parameters

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


def hf_config(name: str, vocab_size: int = VOCAB):
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=vocab_size, chunk_size=64, eos_token_id=vocab_size - 1, pad_token_id=0,
                        bos_token_id=None, **CONFIGS[name])


def randomise(model, seed: int) -> None:
    """Every parameter off its structured init (plain norms centred on 1, A = exp(A_log) in [0.05, 1.55])."""
    randomise_parameters(model, seed, norm_offset=1.0, decay_rate_range=(0.05, 1.55))


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
