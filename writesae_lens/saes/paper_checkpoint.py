"""Import the WriteSAE paper's released checkpoints (`best.pt` / `final.pt`) into WriteSAEs.

A checkpoint is a torch file holding a dict with `model_state_dict` and `config` (sae_type,
n_features, d_k, d_v, k, rank, use_batchtopk, layer, head, ...). Parameter names by sae_type:

    bilinear           V_enc [F,R,d_k]  W_enc [F,R,d_v]  b_enc [F]  V_dec [F,R,d_k]  W_dec [F,R,d_v]  bias [d_k,d_v]
    bilinear_tied      as bilinear; encoder factors are the decoder ones (V_enc/W_enc optional)
    bilinear_jumprelu  as bilinear, plus log_threshold [F]
    rank1 (MatrixSAE)  encoder.weight [F, d_k*d_v]  encoder.bias [F]  V [F,R,d_k]  W [F,R,d_v]  bias [d_k,d_v]
    flat (FlatSAE)     encoder.weight [F, d_in]  encoder.bias [F]  decoder.weight [d_in, F]  decoder.bias [d_in]

Older rank-1 files store 2-D factors [F, d]; they are read as [F, 1, d]. The paper's `W_dec` /
`W` is the VALUE-side factor and `V_dec` / `V` the KEY-side one; here they become `W_dec_value`
and `W_dec_key`.

The paper's SAEs do not centre their input: the encoder sees the raw state and the decoder bias
is only added to the reconstruction. Imported SAEs therefore have `apply_b_dec_to_input=False`,
and reproduce the paper's forward: TopK (per state), BatchTopK (batch-relative; imported as a
`WriteBatchTopKTrainingSAE`, whose encode is batch-relative), JumpReLU (threshold =
exp(log_threshold)). Flat checkpoints become SAELens' own `TopKSAE` / `BatchTopKTrainingSAE`.

State layout. The paper's Mamba-2 SAEs were trained on transformers' cache, `h_t` of shape
[head_dim, d_state] per head, the transpose of this library's `hook_state` ([d_state, head_dim] =
[d_k, d_v], key side first). `state_layout="head_dim_first"` converts such a checkpoint: the
factors swap roles (the paper's d_state-side factor becomes the key side), the dense encoder's
columns and the flat decoder's rows are permuted from vec(h) to vec(h^T), and the bias matrix is
transposed; the imported SAE then takes our `hook_state` and gives the paper's codes. Gated
DeltaNet checkpoints are "key_first" (kept as they are). The default, `state_layout="auto"`,
decides from the evidence (`paper_state_layout`: a `model=`, a family named in the config, or the
state shape and recipe of the authors' runs) and refuses when there is none, since a wrong layout
runs without an error. With `model=`, the imported SAE's (d_k, d_v), layer and head are checked
against the model.

Inference threshold. The paper's BatchTopK SAEs keep no threshold, so an imported BatchTopK SAE
has none either (NaN): `save_inference_model` refuses until `estimate_batchtopk_threshold_` has
computed one from states, as SAELens' trainer does during training.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAE, SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from torch import Tensor

from writesae_lens.saes.batchtopk import WriteBatchTopKTrainingSAE, WriteBatchTopKTrainingSAEConfig
from writesae_lens.saes.jumprelu import WriteJumpReLUSAE, WriteJumpReLUSAEConfig
from writesae_lens.saes.paper_state_layout import (
    AUTO,
    STATE_LAYOUTS,
    LayoutDecision,
    StateLayoutError,
    decide_state_layout,
    how_to_choose,
)
from writesae_lens.saes.topk import WriteTopKSAE, WriteTopKSAEConfig

SUPPORTED_SAE_TYPES = ("bilinear", "bilinear_tied", "bilinear_jumprelu", "rank1", "flat")
KNOWN_UNSUPPORTED_SAE_TYPES = ("bilinear_flat", "bilinear_gated")
# buffers in the paper's state dicts that carry no model weights
IGNORED_KEYS = ("steps_since_active",)
# "key_first": trained on [d_k, d_v] states as hook_state gives them (Gated DeltaNet: transformers' cache is key-first).
# "head_dim_first": trained on transformers' Mamba-2 cache [head_dim, d_state], the transpose of hook_state.
# "auto": decided from the model or the checkpoint (paper_state_layout.decide_state_layout), refused when it cannot be.
StateLayout = Literal["auto", "key_first", "head_dim_first"]
STATE_LAYOUT_CHOICES = (AUTO, *STATE_LAYOUTS)


class PaperCheckpointError(ValueError):
    """A file or dict that is not a paper checkpoint this importer can read."""


class PaperStateLayoutError(PaperCheckpointError, StateLayoutError):
    """The state layout of a paper checkpoint cannot be decided, or does not fit the model given."""


@dataclass(frozen=True)
class PaperSAESpec:
    """What the importer needs to know about a paper checkpoint."""

    sae_type: str
    n_features: int
    d_k: int
    d_v: int
    rank: int
    k: int | None
    use_batchtopk: bool
    layer: int | None
    head: int | None

    @property
    def d_in(self) -> int:
        return self.d_k * self.d_v


# ---- entry points -------------------------------------------------------------------------------


def load_paper_checkpoint(
    path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_pickle: bool = False,
    state_layout: str = "auto",  # a StateLayout; checked below with a clear error
    model: Any = None,
) -> SAE[Any]:
    """Read a paper checkpoint file and return the matching SAE (see `convert_paper_checkpoint`
    for state_layout and model).

    The file is read with `torch.load(weights_only=True)`; pass trust_pickle=True to allow
    arbitrary pickled objects in a file you trust.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # pickle errors have many types
        if trust_pickle:
            raise
        raise PaperCheckpointError(
            f"Could not read {path} as a plain tensor/dict torch file ({error}). If you trust the "
            "file, call load_paper_checkpoint(..., trust_pickle=True)."
        ) from error
    return convert_paper_checkpoint(
        checkpoint, dtype=dtype, device=device, state_layout=state_layout, model=model
    )


def convert_paper_checkpoint(
    checkpoint: object,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    state_layout: str = "auto",  # a StateLayout; checked below with a clear error
    model: Any = None,
) -> SAE[Any]:
    """Turn a loaded paper checkpoint dict into a WriteSAE (or SAELens SAE for flat checkpoints).

    state_layout: the layout of the states the checkpoint was trained on. "key_first" (the Gated
    DeltaNet checkpoints, trained on transformers' [d_k, d_v] cache, which hook_state keeps),
    "head_dim_first" (the Mamba-2 checkpoints, trained on transformers' [head_dim, d_state]
    cache, the transpose of hook_state; see the module docstring), or "auto" (default): decided
    from `model`, else from a model family the config names, else from the state shape and
    recipe of the authors' runs; a PaperStateLayoutError naming both layouts when none of these
    tells. The result always takes hook_state's layout; `metadata.paper_state_layout` and
    `metadata.paper_state_layout_reason` record the layout used and why.

    model: the hooked model the SAE is for (optional). It decides "auto" (HookedMamba2 ->
    head_dim_first, other families -> key_first), and the imported SAE's (d_k, d_v), layer and
    head are checked against it whatever the layout.
    """
    state, config = _unpack(checkpoint)
    state = {name: tensor for name, tensor in state.items() if name not in IGNORED_KEYS}
    sae_type = _resolve_sae_type(config, state)
    state = {name: _upgrade_2d_factor(name, tensor) for name, tensor in state.items()}
    spec = _read_spec(sae_type, config, state)
    try:
        decision = decide_state_layout(state_layout, config, spec.d_k, spec.d_v, model=model)
    except StateLayoutError as error:
        raise PaperStateLayoutError(str(error)) from error
    if decision.layout == "head_dim_first":
        state, spec = transpose_state_layout(state, spec)
    if model is not None:
        check_against_model(spec, model, decision)
    convert = _CONVERTERS[sae_type]
    sae = convert(state, spec, dtype)
    sae.cfg.metadata = _metadata(spec, config, decision)
    if hasattr(sae.cfg, "add_training_info_to_metadata"):
        sae.cfg.add_training_info_to_metadata()
    return sae.to(device=device)


def check_against_model(spec: PaperSAESpec, model: Any, decision: LayoutDecision) -> None:
    """The imported SAE (spec after any transposition) fits `model`'s hook_state: its (d_k, d_v),
    and the layer and head it was trained on."""
    cfg = model.cfg
    why = f"state_layout={decision.layout!r} ({decision.reason})"
    if (spec.d_k, spec.d_v) != (cfg.d_k, cfg.d_v):
        transposed = (spec.d_v, spec.d_k) == (cfg.d_k, cfg.d_v)
        hint = (
            " The transposed shape would fit: the layout is probably the other one. "
            if transposed
            else " It was trained on another model. "
        )
        raise PaperStateLayoutError(
            f"Imported with {why}, the SAE encodes [d_k, d_v] = [{spec.d_k}, {spec.d_v}] states, but "
            f"{type(model).__name__}'s hook_state is [{cfg.d_k}, {cfg.d_v}] per head.{hint}"
            + how_to_choose()
        )
    if spec.layer is not None and spec.layer not in cfg.recurrent_layers:
        raise PaperStateLayoutError(
            f"The checkpoint was trained on layer {spec.layer}, which is not a recurrent layer of "
            f"{type(model).__name__} (recurrent layers: {cfg.recurrent_layers})."
        )
    if spec.head is not None and not 0 <= spec.head < cfg.n_heads:
        raise PaperStateLayoutError(
            f"The checkpoint was trained on head {spec.head}; {type(model).__name__} has heads "
            f"0..{cfg.n_heads - 1}."
        )


# ---- reading the checkpoint ---------------------------------------------------------------------


def _unpack(checkpoint: object) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not isinstance(checkpoint, Mapping) or "model_state_dict" not in checkpoint:
        found = sorted(checkpoint.keys()) if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise PaperCheckpointError(
            "Not a WriteSAE paper checkpoint: expected a dict with 'model_state_dict' and "
            f"'config', found {found}."
        )
    state = dict(checkpoint["model_state_dict"])
    config = dict(checkpoint.get("config") or {})
    return state, config


def _resolve_sae_type(config: Mapping[str, Any], state: Mapping[str, Tensor]) -> str:
    sae_type = config.get("sae_type") or _sae_type_from_keys(state)
    if sae_type in SUPPORTED_SAE_TYPES:
        return sae_type
    why = (
        "known from the paper but not supported here"
        if sae_type in KNOWN_UNSUPPORTED_SAE_TYPES
        else "unknown"
    )
    raise PaperCheckpointError(
        f"Paper checkpoint sae_type {sae_type!r} is {why}; supported sae_types are "
        f"{SUPPORTED_SAE_TYPES}. State-dict keys found: {sorted(state)}."
    )


def _sae_type_from_keys(state: Mapping[str, Tensor]) -> str:
    keys = set(state)
    if "b_gate" in keys:
        return "bilinear_gated"
    if "V_enc" in keys and "decoder.weight" in keys:
        return "bilinear_flat"
    if "log_threshold" in keys:
        return "bilinear_jumprelu"
    if "V_enc" in keys:
        return "bilinear"
    if "V_dec" in keys:
        return "bilinear_tied"
    if {"V", "encoder.weight"} <= keys:
        return "rank1"
    if {"encoder.weight", "decoder.weight"} <= keys:
        return "flat"
    return f"<unrecognised; no sae_type in config, keys {sorted(keys)}>"


def _upgrade_2d_factor(name: str, tensor: Tensor) -> Tensor:
    """Older rank-1 checkpoints store factors as [F, d]; read them as [F, 1, d]."""
    if name in ("V_enc", "W_enc", "V_dec", "W_dec", "V", "W") and tensor.dim() == 2:
        return tensor[:, None, :]
    return tensor


def _read_spec(
    sae_type: str, config: Mapping[str, Any], state: Mapping[str, Tensor]
) -> PaperSAESpec:
    bias = state.get("bias")
    key_factor = state.get("V_dec", state.get("V"))
    n_features = config.get("n_features")
    if n_features is None:
        encoder_bias = state.get("b_enc", state.get("encoder.bias"))
        if encoder_bias is None:
            raise PaperCheckpointError(
                f"Paper checkpoint ({sae_type}) does not say n_features: no 'n_features' in its "
                "config and no 'b_enc' / 'encoder.bias' to read it from."
            )
        n_features = int(encoder_bias.shape[0])
    d_k = config.get("d_k", None if bias is None else int(bias.shape[0]))
    d_v = config.get("d_v", None if bias is None else int(bias.shape[1]))
    if d_k is None or d_v is None:
        raise PaperCheckpointError(
            f"Paper checkpoint ({sae_type}) does not say d_k and d_v: the config has neither and "
            "there is no [d_k, d_v] 'bias' to read them from."
        )
    rank = config.get("rank", 1 if key_factor is None else int(key_factor.shape[1]))
    k = config.get("k")
    if k is None and sae_type != "bilinear_jumprelu":
        raise PaperCheckpointError(f"Paper checkpoint ({sae_type}) has no 'k' in its config.")
    return PaperSAESpec(
        sae_type=sae_type,
        n_features=int(n_features),
        d_k=int(d_k),
        d_v=int(d_v),
        rank=int(rank),
        # the paper's code clamps k to the number of features
        k=None if k is None else min(int(k), int(n_features)),
        use_batchtopk=bool(config.get("use_batchtopk", False)),
        layer=_int_or_none(config.get("layer")),
        head=_int_or_none(config.get("head")),
    )


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _take(
    state: dict[str, Tensor], name: str, shape: tuple[int, ...], spec: PaperSAESpec
) -> Tensor:
    if name not in state:
        raise PaperCheckpointError(
            f"Paper checkpoint ({spec.sae_type}) lacks parameter {name!r}; keys found: "
            f"{sorted(state)}."
        )
    tensor = state.pop(name)
    if tuple(tensor.shape) != shape:
        raise PaperCheckpointError(
            f"Paper checkpoint ({spec.sae_type}): {name!r} has shape {tuple(tensor.shape)}, "
            f"expected {shape} from n_features={spec.n_features}, rank={spec.rank}, "
            f"d_k={spec.d_k}, d_v={spec.d_v}."
        )
    return tensor


def _refuse_leftovers(state: Mapping[str, Tensor], spec: PaperSAESpec) -> None:
    if state:
        raise PaperCheckpointError(
            f"Paper checkpoint ({spec.sae_type}) has parameters this importer does not know: "
            f"{sorted(state)}."
        )


def _metadata(
    spec: PaperSAESpec, config: Mapping[str, Any], decision: LayoutDecision
) -> SAEMetadata:
    plain = (str, int, float, bool, type(None))
    metadata = SAEMetadata(
        paper_checkpoint_config={k: v for k, v in config.items() if isinstance(v, plain)},
        paper_state_layout=decision.layout,
        paper_state_layout_reason=decision.reason,
    )
    if spec.layer is not None:
        metadata.hook_name = f"blocks.{spec.layer}.mixer.hook_state"
    if spec.head is not None:
        metadata.hook_head_index = spec.head
    return metadata


# ---- the transposed (Mamba-2, transformers' cache) layout ---------------------------------------


def transpose_state_layout(
    state: dict[str, Tensor], spec: PaperSAESpec
) -> tuple[dict[str, Tensor], PaperSAESpec]:
    """A checkpoint trained on states X = S^T ([a, b], the paper's d_k = a, d_v = b) rewritten for S ([b, a]).

    A rank-R atom sum_r v_r w_r^T of X is the atom sum_r w_r v_r^T of S, so the two factors swap
    roles (key <-> value side); the bilinear filter v^T X w equals w^T S v, so the encoder factors
    swap too. Dense maps over vec(X) (rank1's encoder, flat's encoder and decoder) are re-indexed
    to vec(S), where vec(X)[i * b + j] = X[i, j] = S[j, i] = vec(S)[j * a + i]. The bias matrix
    is transposed. Returns the rewritten state dict and the spec with d_k, d_v swapped.
    """
    a, b = spec.d_k, spec.d_v  # the checkpoint's own names: its states are [a, b]
    swaps = {"V_enc": "W_enc", "W_enc": "V_enc", "V_dec": "W_dec", "W_dec": "V_dec", "V": "W", "W": "V"}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in swaps:
            out[swaps[name]] = tensor
        elif name == "bias":
            out[name] = tensor.transpose(-2, -1).contiguous() if tensor.dim() == 2 else tensor
        elif name == "encoder.weight":  # [F, a * b] over vec(X) -> [F, b * a] over vec(S)
            out[name] = _transpose_flat_axis(tensor, a, b, axis=1)
        elif name == "decoder.weight":  # [a * b, F]
            out[name] = _transpose_flat_axis(tensor, a, b, axis=0)
        elif name == "decoder.bias":  # [a * b]
            out[name] = _transpose_flat_axis(tensor, a, b, axis=0)
        else:
            out[name] = tensor
    return out, dataclasses.replace(spec, d_k=b, d_v=a)


def _transpose_flat_axis(tensor: Tensor, a: int, b: int, axis: int) -> Tensor:
    """Re-index one axis of length a * b from row-major [a, b] to row-major [b, a]."""
    if tensor.shape[axis] != a * b:
        return tensor  # a wrong shape is reported by the converter, which names the parameter
    moved = tensor.movedim(axis, 0)
    rest = moved.shape[1:]
    swapped = moved.reshape(a, b, *rest).transpose(0, 1).reshape(a * b, *rest)
    return swapped.movedim(0, axis).contiguous()


# ---- BatchTopK: an inference threshold estimated from data ---------------------------------------


def estimate_batchtopk_threshold_(
    sae: SAE[Any], states: Tensor, batch_size: int = 256
) -> float:
    """Give a BatchTopK SAE the inference threshold SAELens' trainer would have given it, from states.

    SAELens' BatchTopK trainer keeps a moving average (step `topk_threshold_lr`) of the smallest
    positive activation of each training batch, and `save_inference_model` turns it into a
    JumpReLU threshold. The paper's checkpoints recorded none. This computes the quantity the
    moving average estimates, the mean over batches of that smallest positive activation, over
    consecutive batches of `batch_size` states (the paper: 256; 128 for Mamba-2) of `states`
    ([n, d_in], a remainder smaller than one batch is left out), and stores it in
    `sae.topk_threshold`. Returns it.
    """
    if not hasattr(sae, "topk_threshold"):
        raise PaperCheckpointError(
            f"{type(sae).__name__} is not a BatchTopK SAE (it has no topk_threshold to estimate)."
        )
    if states.dim() != 2 or states.shape[1] != sae.cfg.d_in:
        raise PaperCheckpointError(
            f"states must be [n, d_in = {sae.cfg.d_in}] (one head's flattened states); got "
            f"{tuple(states.shape)}."
        )
    n_batches = states.shape[0] // batch_size
    if batch_size < 1 or n_batches == 0:
        raise PaperCheckpointError(
            f"estimating a BatchTopK threshold needs at least one batch of batch_size={batch_size} "
            f"states; got {states.shape[0]}."
        )
    smallest = []
    with torch.no_grad():
        for i in range(n_batches):
            batch = states[i * batch_size : (i + 1) * batch_size].to(sae.device, sae.dtype)
            codes = sae.encode(batch)  # batch-relative BatchTopK
            positive = codes[codes > 0]
            if positive.numel():
                smallest.append(positive.min().double())
    if not smallest:
        raise PaperCheckpointError("no latent was active on these states; cannot estimate a threshold.")
    threshold = torch.stack(smallest).mean()
    sae.topk_threshold.copy_(threshold.to(sae.topk_threshold))
    return float(threshold)


class _ThresholdFromData:
    """Imported BatchTopK SAEs: the threshold starts unknown (NaN), and saving an inference SAE
    before `estimate_batchtopk_threshold_` is an error instead of a JumpReLU with threshold 0."""

    topk_threshold: Tensor

    def _mark_threshold_unknown(self) -> None:
        self.topk_threshold.fill_(math.nan)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        if not math.isfinite(float(self.topk_threshold)):
            raise PaperCheckpointError(
                "This BatchTopK SAE was imported from a paper checkpoint, which records no inference "
                "threshold; saving it as a JumpReLU SAE would use threshold 0 and fire far more than k "
                "latents per state. Call writesae_lens.saes.estimate_batchtopk_threshold_(sae, states) "
                "with states of its hook and head first (or keep the batch-relative training SAE: "
                "save_model)."
            )
        super().process_state_dict_for_saving_inference(state_dict)  # type: ignore[misc]


class ImportedWriteBatchTopKSAE(_ThresholdFromData, WriteBatchTopKTrainingSAE):
    """A paper BatchTopK WriteSAE: batch-relative encode; no inference threshold until estimated."""


class ImportedBatchTopKSAE(_ThresholdFromData, BatchTopKTrainingSAE):
    """A paper BatchTopK flat SAE (SAELens' BatchTopK); no inference threshold until estimated."""


# ---- per-sae_type conversions (explicit renames, like TransformerLens' weight converters) ----


def _factor_shapes(spec: PaperSAESpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (spec.n_features, spec.rank, spec.d_k), (spec.n_features, spec.rank, spec.d_v)


def _decoder_weights(
    state: dict[str, Tensor], spec: PaperSAESpec, key: str, value: str
) -> dict[str, Tensor]:
    key_shape, value_shape = _factor_shapes(spec)
    return {
        "W_dec_key": _take(state, key, key_shape, spec),
        "W_dec_value": _take(state, value, value_shape, spec),
        "b_dec": _take(state, "bias", (spec.d_k, spec.d_v), spec).reshape(spec.d_in),
    }


def _bilinear_weights(state: dict[str, Tensor], spec: PaperSAESpec) -> dict[str, Tensor]:
    key_shape, value_shape = _factor_shapes(spec)
    return {
        "W_enc_key": _take(state, "V_enc", key_shape, spec),
        "W_enc_value": _take(state, "W_enc", value_shape, spec),
        "b_enc": _take(state, "b_enc", (spec.n_features,), spec),
        **_decoder_weights(state, spec, "V_dec", "W_dec"),
    }


def _write_sae(
    weights: dict[str, Tensor],
    spec: PaperSAESpec,
    dtype: str,
    encoder_kind: str,
    tied: bool,
    jumprelu: bool = False,
) -> SAE[Any]:
    shape: dict[str, Any] = {
        "d_in": spec.d_in,
        "d_sae": spec.n_features,
        "d_k": spec.d_k,
        "d_v": spec.d_v,
        "rank": spec.rank,
        "encoder_kind": encoder_kind,
        "tied": tied,
        "dtype": dtype,
        "apply_b_dec_to_input": False,  # the paper's encoder sees the raw state
    }
    sae: SAE[Any]
    if jumprelu:
        sae = WriteJumpReLUSAE(WriteJumpReLUSAEConfig(**shape))
    elif spec.use_batchtopk:
        # b_dec_init="zeros": the imported bias must not be replaced by a first-batch mean
        sae = ImportedWriteBatchTopKSAE(
            WriteBatchTopKTrainingSAEConfig(k=spec.k, b_dec_init="zeros", **shape)
        )
    else:
        sae = WriteTopKSAE(WriteTopKSAEConfig(k=spec.k, **shape))
    _load_weights(sae, weights)
    return sae


def _load_weights(sae: SAE[Any], weights: dict[str, Tensor]) -> None:
    """Load converted weights in the SAE's dtype, keeping any buffer the file has no value for."""
    state = {name: tensor.to(sae.b_dec.dtype) for name, tensor in weights.items()}
    for name, buffer in sae.named_buffers():
        state.setdefault(name, buffer)
    sae.load_state_dict(state)
    if isinstance(sae, _ThresholdFromData):
        sae._mark_threshold_unknown()


def _convert_bilinear(state: dict[str, Tensor], spec: PaperSAESpec, dtype: str) -> SAE[Any]:
    weights = _bilinear_weights(state, spec)
    _refuse_leftovers(state, spec)
    return _write_sae(weights, spec, dtype, encoder_kind="bilinear", tied=False)


def _convert_bilinear_tied(state: dict[str, Tensor], spec: PaperSAESpec, dtype: str) -> SAE[Any]:
    weights = {
        "b_enc": _take(state, "b_enc", (spec.n_features,), spec),
        **_decoder_weights(state, spec, "V_dec", "W_dec"),
    }
    for encoder_name, decoder_name in (("V_enc", "W_dec_key"), ("W_enc", "W_dec_value")):
        encoder_factor = state.pop(encoder_name, None)
        if encoder_factor is not None and not torch.equal(encoder_factor, weights[decoder_name]):
            raise PaperCheckpointError(
                f"Paper checkpoint says bilinear_tied but its {encoder_name!r} differs from the "
                "decoder factor it should equal."
            )
    _refuse_leftovers(state, spec)
    return _write_sae(weights, spec, dtype, encoder_kind="bilinear", tied=True)


def _convert_bilinear_jumprelu(
    state: dict[str, Tensor], spec: PaperSAESpec, dtype: str
) -> SAE[Any]:
    weights = _bilinear_weights(state, spec)
    weights["threshold"] = _take(state, "log_threshold", (spec.n_features,), spec).exp()
    _refuse_leftovers(state, spec)
    return _write_sae(weights, spec, dtype, encoder_kind="bilinear", tied=False, jumprelu=True)


def _convert_rank1(state: dict[str, Tensor], spec: PaperSAESpec, dtype: str) -> SAE[Any]:
    encoder_weight = _take(state, "encoder.weight", (spec.n_features, spec.d_in), spec)
    weights = {
        "W_enc_dense": encoder_weight.T.contiguous(),  # [d_in, F]
        "b_enc": _take(state, "encoder.bias", (spec.n_features,), spec),
        **_decoder_weights(state, spec, "V", "W"),
    }
    _refuse_leftovers(state, spec)
    return _write_sae(weights, spec, dtype, encoder_kind="dense", tied=False)


def _convert_flat(state: dict[str, Tensor], spec: PaperSAESpec, dtype: str) -> SAE[Any]:
    """FlatSAE -> SAELens' own TopK SAE (no input centring, no decoder-norm rescaling)."""
    f, d_in = spec.n_features, spec.d_in
    weights = {
        "W_enc": _take(state, "encoder.weight", (f, d_in), spec).T.contiguous(),
        "b_enc": _take(state, "encoder.bias", (f,), spec),
        "W_dec": _take(state, "decoder.weight", (d_in, f), spec).T.contiguous(),
        "b_dec": _take(state, "decoder.bias", (d_in,), spec),
    }
    _refuse_leftovers(state, spec)
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": f,
        "k": spec.k,
        "dtype": dtype,
        "apply_b_dec_to_input": False,
        "rescale_acts_by_decoder_norm": False,
    }
    sae: SAE[Any]
    if spec.use_batchtopk:
        sae = ImportedBatchTopKSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        sae = TopKSAE(TopKSAEConfig(**common))
    _load_weights(sae, weights)
    return sae


_CONVERTERS: dict[str, Callable[[dict[str, Tensor], PaperSAESpec, str], SAE[Any]]] = {
    "bilinear": _convert_bilinear,
    "bilinear_tied": _convert_bilinear_tied,
    "bilinear_jumprelu": _convert_bilinear_jumprelu,
    "rank1": _convert_rank1,
    "flat": _convert_flat,
}
