"""Random HookedRWKV7 models built without fla (whose kernels need triton): for tests that need an RWKV-7 of a given
vocabulary (e.g. the shipped tokenizer's) and non-square heads, where the golden fixtures' checkpoints do not fit."""

import torch

from writesae_lens.adapters.rwkv7 import HookedRWKV7
from writesae_lens.adapters.rwkv7.config import HookedRWKV7Config


def random_rwkv7(d_vocab: int, tokenizer=None, seed: int = 0, n_layers: int = 3, n_heads: int = 4, d_k: int = 16,
                 d_v: int = 24) -> HookedRWKV7:
    """A small RWKV-7 (d_model = n_heads * d_k, as fla ties the key width to the model width) whose every weight is
    drawn at random (no path is zero)."""
    cfg = HookedRWKV7Config(n_layers=n_layers, d_model=n_heads * d_k, d_vocab=d_vocab, n_heads=n_heads, d_k=d_k,
                            d_v=d_v, d_mlp=2 * n_heads * d_k, decay_low_rank_dim=8, gate_low_rank_dim=16,
                            a_low_rank_dim=8, v_low_rank_dim=8, eps=1e-5, model_name="random-rwkv7")
    torch.manual_seed(seed)
    model = HookedRWKV7(cfg, tokenizer)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight drawn here: some are created with torch.empty
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
            elif name.endswith("weight"):  # norm gains
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.1 * noise)
    return model.eval()
