"""Inputs shared by the ported TransformerLens tests."""

import torch


def random_tokens(model, batch: int = 1, n_pos: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=generator).to(model.cfg.device)
