"""Config fields shared by every WriteSAE, mixed into SAELens' config dataclasses.

SAELens keeps one inference config (`SAEConfig` subclass) and one training config
(`TrainingSAEConfig` subclass) per architecture; the factored-dictionary fields below are added to
both by listing these mixins first among the bases.

Every WriteSAE config dataclass is marked `@no_type_check`: SAELens' `SAEConfig.from_dict` calls
the constructor with `metadata` as a plain dict and replaces it right after, which a runtime type
checker on `__init__` (the test suite's jaxtyping + beartype hook) would reject. The fields are
validated by `__post_init__` instead, with errors that say what is valid.
"""

from dataclasses import dataclass
from typing import Any, no_type_check

ENCODER_KINDS = ("bilinear", "dense")
B_DEC_INITS = ("mean", "zeros")
# Activation normalisations a factored dictionary can live with. Runtime per-sample rescaling and
# whitening would have to be folded into the factors, which a d_in x d_in map cannot be.
SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in")


@no_type_check  # SAELens builds configs with a dict metadata; see the module docstring
@dataclass(kw_only=True)
class WriteSAEShapeFields:
    """Shape of the factored dictionary.

    Args:
        d_k: key dimension of one head's state (rows of the [d_k, d_v] matrix).
        d_v: value dimension (columns). d_in must equal d_k * d_v.
        rank: rank R of every atom, A_i = sum_{r<R} p_{i,r} q_{i,r}^T (paper default 1).
        encoder_kind: "bilinear" (matched filter, z_i = sum_r u_{i,r}^T (S - B_dec) w_{i,r} + b_i)
            or "dense" (a [d_in, d_sae] linear map on vec(S - B_dec), the paper's "rank1"/MatrixSAE).
        tied: bilinear only; use the decoder factors as the encoder factors.
    """

    d_k: int
    d_v: int
    rank: int = 1
    encoder_kind: str = "bilinear"
    tied: bool = False

    def __post_init__(self) -> None:
        validate_shape_fields(self)
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()


@no_type_check  # SAELens builds configs with a dict metadata; see the module docstring
@dataclass(kw_only=True)
class WriteTrainingFields(WriteSAEShapeFields):
    """Training-only fields shared by the WriteSAE training configs.

    Args:
        decoder_renorm_every: rescale every decoder factor row to unit norm at the start of every
            n-th training step (1 = every step; the paper's code uses 100; 0 = never).
        b_dec_init: "mean" sets the decoder bias to the mean state of the first training batch
            (inputs are then centred when apply_b_dec_to_input is True); "zeros" keeps it at 0.
        resample_dead_every: every n-th step, re-seed latents the trainer reports dead from the
            worst-reconstructed states of the batch (paper 2.1). 0 = off (default).
        decoder_init_norm: SAELens' decoder-norm heuristic; not used by WriteSAEs, whose factors
            start and stay at unit norm. Must be None.
    """

    decoder_renorm_every: int = 1
    b_dec_init: str = "mean"
    resample_dead_every: int = 0
    decoder_init_norm: float | None = None

    def __post_init__(self) -> None:
        validate_training_fields(self)
        super().__post_init__()


def validate_shape_fields(cfg: Any) -> None:
    """Raise ValueError naming the bad field and what is valid."""
    for name in ("d_k", "d_v", "rank", "d_sae"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"WriteSAE config: {name} must be a positive integer, got {value!r}.")
    if cfg.d_in != cfg.d_k * cfg.d_v:
        raise ValueError(
            f"WriteSAE config: d_in must equal d_k * d_v (the flattened [d_k, d_v] state), but "
            f"d_in = {cfg.d_in} and d_k * d_v = {cfg.d_k} * {cfg.d_v} = {cfg.d_k * cfg.d_v}."
        )
    if cfg.encoder_kind not in ENCODER_KINDS:
        raise ValueError(
            f"WriteSAE config: encoder_kind must be one of {ENCODER_KINDS}, got {cfg.encoder_kind!r}."
        )
    if cfg.tied and cfg.encoder_kind != "bilinear":
        raise ValueError(
            "WriteSAE config: tied=True shares the bilinear encoder factors with the decoder, so "
            f"it needs encoder_kind='bilinear' (got {cfg.encoder_kind!r})."
        )
    k = getattr(cfg, "k", None)
    if k is not None and cfg.architecture() == "write_batchtopk":
        # BatchTopK keeps int(k * n) latents of a batch of n: k is a mean and may be fractional
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= cfg.d_sae:
            raise ValueError(
                f"WriteSAE config: k must be a number (mean active latents per state) with "
                f"0 < k <= d_sae = {cfg.d_sae}, got {k!r}."
            )
    elif k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.d_sae):
        raise ValueError(
            f"WriteSAE config: k must be an integer with 1 <= k <= d_sae = {cfg.d_sae}, got {k!r}."
        )
    if cfg.normalize_activations not in SUPPORTED_NORMALIZATIONS:
        raise ValueError(
            f"WriteSAE config: normalize_activations={cfg.normalize_activations!r} is not supported "
            f"by the factored dictionary; use one of {SUPPORTED_NORMALIZATIONS}."
        )
    if cfg.normalize_activations == "expected_average_only_in" and cfg.tied:
        raise ValueError(
            "WriteSAE config: a tied SAE cannot absorb the activation scaling factor at the end of "
            "training (encoder and decoder share factors); use normalize_activations='none'."
        )
    if cfg.reshape_activations != "none":
        raise ValueError(
            "WriteSAE config: reshape_activations must be 'none'; the SAE receives one head's "
            f"flattened state, got {cfg.reshape_activations!r}."
        )


def validate_training_fields(cfg: Any) -> None:
    """Raise ValueError naming the bad training field and what is valid."""
    for name in ("decoder_renorm_every", "resample_dead_every"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"WriteSAE config: {name} must be an integer >= 0, got {value!r}.")
    if cfg.b_dec_init not in B_DEC_INITS:
        raise ValueError(
            f"WriteSAE config: b_dec_init must be one of {B_DEC_INITS}, got {cfg.b_dec_init!r}."
        )
    if cfg.decoder_init_norm is not None:
        raise ValueError(
            "WriteSAE config: decoder_init_norm must be None; the factored decoder starts and "
            "stays at unit-norm factors (see decoder_renorm_every)."
        )
