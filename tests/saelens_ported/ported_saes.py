"""Builders for the ported SAELens tests: tiny WriteSAEs of every architecture, rank and encoder kind."""

import torch

import writesae_lens.saes as ws

D_K, D_V = 4, 6
D_IN = D_K * D_V
D_SAE = 16
K = 3

ARCHITECTURES = ("write_topk", "write_batchtopk", "write_jumprelu")
VARIANTS = [(arch, rank, encoder) for arch in ARCHITECTURES for rank in (1, 2) for encoder in ("bilinear", "dense")]

TRAINING_CLASSES = {
    "write_topk": (ws.WriteTopKTrainingSAE, ws.WriteTopKTrainingSAEConfig),
    "write_batchtopk": (ws.WriteBatchTopKTrainingSAE, ws.WriteBatchTopKTrainingSAEConfig),
    "write_jumprelu": (ws.WriteJumpReLUTrainingSAE, ws.WriteJumpReLUTrainingSAEConfig),
}
INFERENCE_CLASSES = {
    "write_topk": (ws.WriteTopKSAE, ws.WriteTopKSAEConfig),
    "write_jumprelu": (ws.WriteJumpReLUSAE, ws.WriteJumpReLUSAEConfig),
}


def variant_id(variant) -> str:
    arch, rank, encoder = variant
    return f"{arch.removeprefix('write_')}-r{rank}-{encoder}"


def shape_kwargs(rank: int, encoder: str, **extra) -> dict:
    return dict(d_in=D_IN, d_sae=D_SAE, d_k=D_K, d_v=D_V, rank=rank, encoder_kind=encoder) | extra


def training_cfg(variant, **extra):
    arch, rank, encoder = variant
    kwargs = shape_kwargs(rank, encoder, **extra)
    if arch != "write_jumprelu":
        kwargs.setdefault("k", K)
    else:
        kwargs.setdefault("jumprelu_init_threshold", 0.05)
        kwargs.setdefault("jumprelu_bandwidth", 0.05)
    return TRAINING_CLASSES[arch][1](**kwargs)


def training_sae(variant, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = training_cfg(variant, **extra)
    return TRAINING_CLASSES[variant[0]][0](cfg)


def inference_sae(variant, seed: int = 0, **extra):
    arch, rank, encoder = variant
    torch.manual_seed(seed)
    kwargs = shape_kwargs(rank, encoder, **extra)
    if arch == "write_topk":
        kwargs.setdefault("k", K)
    sae = INFERENCE_CLASSES[arch][0](INFERENCE_CLASSES[arch][1](**kwargs))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.2)
        if arch == "write_jumprelu":
            sae.threshold.uniform_(0.0, 0.2)
    return sae


def states(n: int = 32, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    """[n, d_in] states: sums of a few rank-1 matrices plus an offset and noise."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, 3, D_K, generator=gen)
    values = torch.randn(n, 3, D_V, generator=gen)
    matrices = torch.einsum("njk,njv->nkv", keys, values) + 0.3 + 0.05 * torch.randn(n, D_K, D_V, generator=gen)
    return scale * matrices.reshape(n, D_IN)


def step_input(x, n_training_steps: int = 0, dead=None, l0: float = 1e-3):
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(sae_in=x, coefficients={"l0": l0}, dead_neuron_mask=dead,
                          n_training_steps=n_training_steps, is_logging_step=False)
