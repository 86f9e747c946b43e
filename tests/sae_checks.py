"""Helpers shared by the tests that train WriteSAEs through SAELens' runner."""

from __future__ import annotations

import torch


def explained_variance(sae, states):
    """1 - |states - decode(encode(states))|^2 / |states - mean|^2 over rows of flattened states [n, d_k * d_v]."""
    with torch.no_grad():
        recon = sae.decode(sae.encode(states))
    return float(1 - (states - recon).pow(2).sum() / (states - states.mean(0)).pow(2).sum())
