"""Synthetic states and small configs shared by the WriteSAE tests."""

import torch

import writesae_lens.saes as ws

D_K, D_V = 4, 6  # deliberately non-square, so a key/value swap cannot pass silently
D_IN = D_K * D_V


def low_rank_states(
    n: int,
    d_k: int = D_K,
    d_v: int = D_V,
    n_true_atoms: int = 24,
    atoms_per_state: int = 3,
    noise: float = 0.01,
    offset: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """[n, d_k * d_v] states: a few rank-1 outer products from a fixed dictionary, plus noise.

    A constant offset matrix plays the part of the mean state the decoder bias should learn.
    """
    gen = torch.Generator().manual_seed(seed)
    dictionary_gen = torch.Generator().manual_seed(1234)  # same dictionary for every seed
    keys = torch.nn.functional.normalize(torch.randn(n_true_atoms, d_k, generator=dictionary_gen), dim=-1)
    values = torch.nn.functional.normalize(torch.randn(n_true_atoms, d_v, generator=dictionary_gen), dim=-1)
    mean_state = offset * torch.randn(d_k, d_v, generator=dictionary_gen)
    chosen = torch.rand(n, n_true_atoms, generator=gen).argsort(dim=-1)[:, :atoms_per_state]
    coefficients = 1.0 + torch.rand(n, atoms_per_state, generator=gen)
    states = torch.einsum("nj,njk,njv->nkv", coefficients, keys[chosen], values[chosen])
    states = states + mean_state + noise * torch.randn(n, d_k, d_v, generator=gen)
    return states.reshape(n, d_k * d_v)


def shape_kwargs(
    d_sae: int = 16, rank: int = 1, encoder_kind: str = "bilinear", tied: bool = False
) -> dict:
    return dict(
        d_in=D_IN, d_sae=d_sae, d_k=D_K, d_v=D_V, rank=rank, encoder_kind=encoder_kind, tied=tied
    )


# (name, encoder_kind, tied, rank) for parametrised tests with readable ids
ENCODER_VARIANTS = [
    ("bilinear-r1", "bilinear", False, 1),
    ("bilinear-r2", "bilinear", False, 2),
    ("tied-r1", "bilinear", True, 1),
    ("dense-r1", "dense", False, 1),
    ("dense-r3", "dense", False, 3),
]
VARIANT_IDS = [v[0] for v in ENCODER_VARIANTS]


def make_inference_sae(architecture: str, encoder_kind: str, tied: bool, rank: int, **extra):
    kwargs = shape_kwargs(rank=rank, encoder_kind=encoder_kind, tied=tied) | extra
    if architecture == "write_topk":
        return ws.WriteTopKSAE(ws.WriteTopKSAEConfig(k=kwargs.pop("k", 3), **kwargs))
    if architecture == "write_jumprelu":
        sae = ws.WriteJumpReLUSAE(ws.WriteJumpReLUSAEConfig(**kwargs))
        with torch.no_grad():
            sae.threshold.uniform_(0.0, 0.3)
        return sae
    raise ValueError(architecture)


def make_training_sae(architecture: str, encoder_kind: str, tied: bool, rank: int, **extra):
    kwargs = shape_kwargs(rank=rank, encoder_kind=encoder_kind, tied=tied) | extra
    if architecture == "write_topk":
        return ws.WriteTopKTrainingSAE(ws.WriteTopKTrainingSAEConfig(k=kwargs.pop("k", 3), **kwargs))
    if architecture == "write_batchtopk":
        return ws.WriteBatchTopKTrainingSAE(
            ws.WriteBatchTopKTrainingSAEConfig(k=kwargs.pop("k", 3), **kwargs)
        )
    if architecture == "write_jumprelu":
        return ws.WriteJumpReLUTrainingSAE(ws.WriteJumpReLUTrainingSAEConfig(**kwargs))
    raise ValueError(architecture)


def randomize_biases_(sae) -> None:
    """Give b_enc and b_dec non-trivial values so tests exercise them."""
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.3)
