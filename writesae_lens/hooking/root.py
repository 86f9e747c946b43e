"""``HookedRecurrentLM``: the family-independent front end of every hooked model in the library.

A family adapter (``writesae_lens.adapters.<family>``) builds the modules; this base class gives them the
TransformerLens surface that SAELens and researchers call: ``to_tokens`` / ``to_string``, ``forward`` with
``return_type`` / ``loss_per_token`` / ``stop_at_layer``, ``generate`` with a recurrent cache, hook-name checks with
helpful errors, and caching that slices the position axis of ``[batch, pos, ...]`` hooks correctly.

A subclass provides ``cfg`` (see ``ModelConfigProtocol``), ``tokenizer`` (or None), and the modules ``embed``
(tokens -> residual), ``hook_embed``, ``blocks`` (each called as ``block(resid, layer_cache, pos_offset)``),
``ln_final`` and ``unembed`` (residual -> logits), then calls ``self.setup()``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from ..ops.gated_delta import at_positions
from .activation_cache import RecurrentActivationCache
from .cache import RecurrentCache
from .hook_checks import check_on_attach, keeping_activation_form
from .padding import masked_next_token_loss, pad_mask_for_call
from .sampling import sample_next_token
from .write_mixer import SPARSE_HOOK_NAMES

ReturnType = Literal["logits", "loss", "both"] | None
# Hooks whose position axis is not dim 1: attention scores/patterns are [batch, head, query_pos, key_pos].
QUERY_AXIS_HOOKS = ("hook_attn_scores", "hook_pattern")


class HookedRecurrentLM(HookedRootModule):
    cfg: Any
    tokenizer: Any

    # ------------------------------------------------------------------ loading
    # Keys a family's checkpoints carry that the hooked model never uses (read neither from disk nor into memory).
    skip_checkpoint_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        tokenizer=None,
        load_tokenizer: bool = True,
        torch_dtype: torch.dtype | str | None = None,
    ):
        """Load a local transformers checkpoint folder or a hub id (hub ids need a network; the code path after the
        download is the same). ``device`` defaults to CUDA when available. ``dtype`` (default float32) is a torch
        dtype or its name (``"bfloat16"``); ``torch_dtype`` is transformers' name for it (pass one of the two)."""
        from transformers import AutoConfig

        from .loading import (
            load_checkpoint_tensors,
            resolve_device,
            resolve_dtype_arguments,
            resolve_folder,
            try_load_tokenizer,
        )

        device, dtype = resolve_device(device), resolve_dtype_arguments(dtype, torch_dtype)  # clear errors
        folder = resolve_folder(name_or_path)
        cls._check_folder(folder)
        hf_config = AutoConfig.from_pretrained(folder)
        cls._check_hf_config(hf_config)
        if tokenizer is None and load_tokenizer:
            tokenizer = try_load_tokenizer(folder)
        tensors = load_checkpoint_tensors(folder, skip_prefixes=cls.skip_checkpoint_prefixes)
        model = cls._from_config_and_weights(hf_config, tensors, device, dtype, tokenizer)
        model.cfg.model_name = str(name_or_path)
        return model

    @classmethod
    def from_hf_model(cls, hf_model, tokenizer=None, device=None, dtype: torch.dtype | None = None):
        """Convert an instantiated transformers model of the family (same weights, same device and dtype by default)."""
        cls._check_hf_config(hf_model.config)
        first = next(hf_model.parameters())
        return cls._from_config_and_weights(
            hf_model.config, hf_model.state_dict(), device or first.device, dtype or first.dtype, tokenizer
        )

    @classmethod
    def _check_folder(cls, folder) -> None:
        """Family hook: reject a folder before transformers reads it (default: accept)."""

    @classmethod
    def _check_hf_config(cls, hf_config) -> None:
        """Family hook: a clear error for configs of other model types."""
        raise NotImplementedError

    @classmethod
    def _from_config_and_weights(cls, hf_config, hf_state: dict, device, dtype, tokenizer):
        """Family hook: build the model from a transformers config and state dict."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tokens
    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokenise one string or a list of strings into ``[batch, pos]``, padded with the pad token on
        ``padding_side`` (default: the tokenizer's ``padding_side``, else right). ``to_tokens_and_mask`` also
        returns which positions are pads."""
        return self._tokenize(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def _tokenize(self, input, prepend_bos, padding_side, move_to_device=True, truncate=True) -> tuple[Tensor, Tensor]:
        """``(tokens, attention_mask)`` [batch, pos] of one string or a list of strings (mask: 1 real, 0 pad)."""
        tokenizer = self._require_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"to_tokens takes a string or a non-empty list of strings, got {type(input).__name__}")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend_bos and tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but this tokenizer has no BOS token; pass prepend_bos=False")
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        if prepend_bos:
            ids = [[tokenizer.bos_token_id] + seq for seq in ids]
        if truncate:
            ids = [seq[: self.cfg.n_ctx] for seq in ids]
        width = max(len(seq) for seq in ids)
        pad = self._pad_token_id()
        side = self._padding_side(padding_side)
        padded, mask = [], []
        for seq in ids:
            fill = width - len(seq)
            padded.append(seq + [pad] * fill if side == "right" else [pad] * fill + seq)
            mask.append([1] * len(seq) + [0] * fill if side == "right" else [0] * fill + [1] * len(seq))
        tokens, mask = torch.tensor(padded, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        return (tokens.to(self.cfg.device), mask.to(self.cfg.device)) if move_to_device else (tokens, mask)

    def _padding_side(self, padding_side) -> str:
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        default = getattr(self.tokenizer, "padding_side", None) if self.tokenizer is not None else None
        return padding_side or default or "right"

    def to_tokens_and_mask(self, texts: list[str], prepend_bos: bool | None = None,
                           padding_side: Literal["left", "right"] = "left") -> tuple[Tensor, Tensor]:
        """Padded tokens [batch, pos] of several strings (left-padded by default) and their ``attention_mask``
        (1 = real, 0 = pad)."""
        return self._tokenize(list(texts), prepend_bos, padding_side)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); a clear error otherwise."""
        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a string, got {type(string).__name__}")
        tokens = self.to_tokens(string, prepend_bos=False, truncate=False)[0]
        if tokens.numel() != 1:
            pieces = [self.tokenizer.decode([t]) for t in tokens.tolist()]
            raise ValueError(f"{string!r} is {tokens.numel()} tokens ({pieces}), not one")
        return int(tokens[0])

    def get_token_position(
        self,
        single_token: str | int,
        input: str | Tensor,
        mode: str = "first",  # "first" or "last" (checked below, with a clear error)
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """The position of ``single_token`` (a one-token string or an id) in ``input`` (a string, tokenised as
        ``to_tokens`` does, or tokens ``[pos]`` / ``[1, pos]``): its first or last occurrence."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence; got a batch of {tokens.shape[0]}")
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be [pos] or [1, pos]; got shape {tuple(tokens.shape)}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        found = (tokens == token).nonzero().flatten()
        if found.numel() == 0:
            raise ValueError(f"token {token} ({single_token!r}) does not occur in the input")
        return int(found[0] if mode == "first" else found[-1])

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Tensor:
        """The residual direction whose dot product with the final-normalised stream is a token's logit:
        ``gain * W_U[:, token]``, where ``gain`` [d_model] is the final norm's elementwise weight (TransformerLens folds
        it into ``W_U``; here the weights are not folded). ``[d_model]`` for one token, ``[*tokens.shape, d_model]``
        for a tensor of them. With these, ``cache.logit_attrs`` of ``cache.decompose_resid()`` sums to the logits
        (less the final norm's bias term, ``bias @ W_U``, on families whose final norm has one)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        if tokens.is_floating_point():
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        directions = self.W_U[:, tokens]  # [d_model, *tokens.shape]
        directions = directions.movedim(0, -1) if tokens.dim() else directions
        return directions * self.final_norm_gain().to(directions.dtype)

    def final_norm_gain(self) -> Tensor:
        """The elementwise weight [d_model] that ``ln_final`` multiplies the normalised stream by (family hook)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its final norm's gain")

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode ``[pos]`` to a string or ``[batch, pos]`` to a list of strings."""
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [tokenizer.decode(row.tolist()) for row in tokens]
        return tokenizer.decode(tokens.tolist())

    def to_str_tokens(
        self,
        input: str | list | Tensor | int,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> list[str] | list[list[str]]:
        """One string per token: of a string (tokenised as ``to_tokens`` with ``prepend_bos``), of token ids
        (``[pos]``, ``[1, pos]``, an int), or, for a list of strings or a ``[batch, pos]`` tensor, one list per row."""
        tokenizer = self._require_tokenizer()
        if isinstance(input, list) and input and not all(isinstance(x, int) for x in input):
            return [self.to_str_tokens(item, prepend_bos=prepend_bos, padding_side=padding_side) for item in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            tokens = torch.as_tensor(input)
            if tokens.dim() == 2 and tokens.shape[0] > 1:
                return [self.to_str_tokens(row) for row in tokens]
            tokens = tokens.reshape(-1)
        if tokens.is_floating_point():
            raise TypeError(f"token ids must be integers, got {tokens.dtype}")
        return [tokenizer.decode([t]) for t in tokens.tolist()]

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token tensors, or load one with a tokenizer")
        return self.tokenizer

    def _pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # Streams besides the residual stream that a run with ``start_at_layer`` needs: forward keyword -> the hook whose
    # activation [batch, pos, ...] over the same positions is that stream (e.g. RWKV-7's v-first). Empty for families
    # whose later layers read only the residual stream.
    carried_streams: dict[str, str] = {}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: str | list[str] | Tensor,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        stop_at_layer: int | None = None,
        cache: RecurrentCache | None = None,
        start_at_layer: int | None = None,
        tokens: Tensor | None = None,
        final_positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        padding_side: Literal["left", "right"] | None = None,
        past_kv_cache: RecurrentCache | None = None,
    ):
        """Run the model. ``return_type``: "logits" ``[batch, pos, d_vocab]``, "loss" (mean next-token loss, or
        ``[batch, pos - 1]`` with ``loss_per_token``), "both" (logits, loss), None. ``stop_at_layer=n`` returns the
        residual stream entering block n (``n = n_layers``: the final one, before ``ln_final``; only then can a cache
        be passed with it). ``start_at_layer=n`` takes that residual stream ``[batch, pos, d_model]``
        as ``input`` and runs blocks n onwards (pass ``tokens`` too for a loss). ``cache``: a ``RecurrentCache`` to
        continue from; it is updated (only its blocks from ``start_at_layer`` on, when that is set).

        ``final_positions`` [batch, n_sel] (long): the logits (or, with ``stop_at_layer=n_layers``, the final residual
        stream) only at those positions of each row, ``[batch, n_sel, ...]``. The cache still covers every position;
        the last block skips its position-wise work elsewhere when it can (``supports_keep``), and then its hook
        points after the mixer see only the selected positions. No loss with it.

        ``attention_mask`` [batch, pos] (1 = token, 0 = pad), as TransformerLens takes it: left-padded rows on a call
        that starts a sequence (the pads contribute nothing to any state, conv window, token shift or attention key),
        or right-padded rows without a cache (``hooking/padding.py``); the loss leaves the pads out. A list of
        strings is padded on ``padding_side`` (default: the tokenizer's, else right) and masked accordingly.
        ``past_kv_cache`` is TransformerLens' name for ``cache`` (a ``RecurrentCache``: recurrent states, conv
        windows and attention keys). Unknown keyword arguments are errors."""
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        given = cache if cache is not None else past_kv_cache
        branch = given is not None and getattr(given, "frozen", False)  # a frozen cache is read from a copy
        cache = self._cache_argument(cache, past_kv_cache)
        if isinstance(input, list) and len(input) > 1 and all(isinstance(x, str) for x in input):
            input, list_mask = self._tokenize(input, prepend_bos, padding_side)
            attention_mask = list_mask if attention_mask is None else attention_mask
        if start_at_layer is not None:
            if not 0 <= start_at_layer < self.cfg.n_layers:
                raise ValueError(f"start_at_layer={start_at_layer} is outside [0, {self.cfg.n_layers})")
            if not isinstance(input, Tensor) or input.dim() != 3 or input.shape[-1] != self.cfg.d_model:
                got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
                raise ValueError(f"with start_at_layer the input is the residual stream [batch, pos, {self.cfg.d_model}]; got {got}")
            if return_type in ("loss", "both") and tokens is None:
                raise ValueError("a loss with start_at_layer needs the tokens: pass tokens=...")
            resid, first = input, start_at_layer
            tokens = self._as_tokens(tokens, prepend_bos) if tokens is not None else None
        else:
            tokens = self._as_tokens(input, prepend_bos)
            resid, first = None, 0
        if stop_at_layer is not None:
            if not -self.cfg.n_layers <= stop_at_layer <= self.cfg.n_layers:
                raise ValueError(f"stop_at_layer={stop_at_layer} is outside [-{self.cfg.n_layers}, {self.cfg.n_layers}]")
        last = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        last = last + self.cfg.n_layers if last < 0 else last  # negative: count from the end, as in transformer_lens
        if cache is not None and last != self.cfg.n_layers and not branch:
            raise ValueError("stop_at_layer before the last layer cannot be combined with a cache (the cache would be "
                             "left half-updated); stop_at_layer=n_layers (the final residual stream) can, and so "
                             "can a frozen cache (cache.freeze()), which calls read without updating")
        first_input = tokens if resid is None else input
        pad = pad_mask_for_call(attention_mask, tuple(first_input.shape[:2]), cache, first_input.device)
        if pad is not None:  # the pads' positions: no write, identity transitions, out of every window and key set
            cache = self.empty_cache() if cache is None else cache
            cache.positions = -pad.sum(1)  # rotary positions count from each row's first real token
            for layer_cache in cache.layers:
                layer_cache["pad"] = pad
        offset = cache.offsets() if cache is not None else 0
        if resid is None:
            resid = self.hook_embed(self.embed(tokens))  # [batch, pos, d_model]
        n_pos = resid.shape[1]
        try:
            resid = self._run_blocks(resid, cache, offset, first, last, final_positions, return_type)
        finally:
            if pad is not None:
                for layer_cache in cache.layers:
                    layer_cache.pop("pad", None)
        if cache is not None:
            cache.advance(n_pos)
        if stop_at_layer is not None:
            return resid
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(resid))  # [batch, pos, d_vocab]
        if return_type == "logits":
            return logits
        loss = masked_next_token_loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(self, logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None,
                per_token: bool = False) -> Tensor:
        """Next-token cross-entropy of ``logits`` [batch, pos, d_vocab] on ``tokens`` [batch, pos], leaving out pads
        (``attention_mask``), as TransformerLens' ``loss_fn``."""
        return masked_next_token_loss(logits, tokens, attention_mask, per_token=per_token)

    @staticmethod
    def _cache_argument(cache, past_kv_cache):
        """The cache of a call from ``cache=`` or TransformerLens' ``past_kv_cache=``; a frozen cache is read from a
        copy, so the call leaves it as it was."""
        if past_kv_cache is not None:
            if cache is not None:
                raise ValueError("pass the cache once: cache= or past_kv_cache= (TransformerLens' name), not both")
            cache = past_kv_cache
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise TypeError(f"the cache must be a RecurrentCache (model.empty_cache()), got {type(cache).__name__}: "
                            "TransformerLens' key-value caches hold attention keys only, not recurrent states")
        if cache is not None and cache.frozen:
            cache = cache.copy()
        return cache

    def _run_blocks(self, resid, cache, offset, first, last, final_positions, return_type) -> Tensor:
        n_pos = resid.shape[1]
        if final_positions is not None:
            final_positions = self._checked_final_positions(final_positions, resid.shape[0], n_pos, last, return_type)
        for layer in range(first, last):
            layer_cache = cache.layers[layer] if cache is not None else None
            block = self.blocks[layer]
            if final_positions is None or layer < self.cfg.n_layers - 1:
                resid = block(resid, layer_cache, offset)
            elif getattr(block, "supports_keep", False):
                resid = block(resid, layer_cache, offset, keep=final_positions)  # [batch, n_sel, d_model]
            else:
                resid = at_positions(block(resid, layer_cache, offset), final_positions)
        return resid

    def _checked_final_positions(self, positions, batch: int, n_pos: int, last: int, return_type) -> Tensor:
        if last != self.cfg.n_layers:
            raise ValueError("final_positions selects outputs of the last layer: it needs stop_at_layer=None or n_layers")
        if return_type in ("loss", "both"):
            raise ValueError("final_positions cannot be combined with a loss (it needs every position's logits)")
        if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.shape[0] != batch \
                or positions.is_floating_point():
            got = f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"final_positions must be an integer tensor [batch={batch}, n_sel]; got {got}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n_pos):
            raise ValueError(f"final_positions must lie in [0, {n_pos}) (positions of this call); got "
                             f"{int(positions.min())}..{int(positions.max())}")
        return positions.to(self.cfg.device, torch.long)

    def _as_tokens(self, input, prepend_bos) -> Tensor:
        if isinstance(input, (str, list)):
            return self.to_tokens(input, prepend_bos=prepend_bos)
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a string, a list of strings or a token tensor, got {type(input).__name__}")
        if input.is_floating_point() or input.dtype == torch.bool or input.is_complex():
            raise TypeError(f"token tensor must have an integer dtype (torch.long), got {input.dtype}")
        if input.dim() == 1:
            input = input[None]
        if input.dim() != 2:
            raise ValueError(f"tokens must be [batch, pos] (or [pos]); got shape {tuple(input.shape)}")
        if input.numel() == 0:
            raise ValueError(f"the token tensor is empty (shape {tuple(input.shape)}); give at least one row and "
                             "position")
        if input.numel() and (int(input.min()) < 0 or int(input.max()) >= self.cfg.d_vocab):
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}); got min {int(input.min())}, max {int(input.max())}")
        return input.to(device=self.cfg.device, dtype=torch.long)

    def empty_cache(self) -> RecurrentCache:
        """A fresh cache to pass as ``forward(..., cache=cache)``."""
        return RecurrentCache.empty(self.cfg.n_layers)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        input: str | list[str] | Tensor = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        return_type: Literal["input", "str", "tokens"] = "input",
        seed: int | None = None,
        verbose: bool = True,
        attention_mask: Tensor | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ):
        """Sample (or, with ``do_sample=False``, greedily decode) ``max_new_tokens`` tokens.

        With ``use_past_kv_cache`` (default) the prompt is run once and each new token costs one step of every layer:
        O(1) work in recurrent layers, a KV cache in attention layers. Hooks stay active throughout: during decoding
        each forward call sees one position (its ``pos`` axis has length 1). Rows that emit EOS keep emitting it.

        Prompts of different lengths: a list of strings is left-padded, or pass left-padded tokens with
        ``attention_mask`` [batch, pos] (1 = real token, 0 = pad); each row then generates what it generates alone.
        Generation needs left padding (``padding_side="left"``, the default here): new tokens follow each row's last
        real token only when no pad comes after it.
        """
        if padding_side not in (None, "left"):
            raise ValueError(f"generate pads prompts on the left (new tokens must follow each row's last real token); "
                             f"padding_side={padding_side!r} is not supported")
        if isinstance(input, list) and len(input) > 1 and attention_mask is None:
            tokens, attention_mask = self.to_tokens_and_mask(input, prepend_bos, padding_side="left")
        else:
            tokens = self._as_tokens(input, prepend_bos)
        eos = eos_token_id if eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        if stop_at_eos and eos is None:
            raise ValueError("stop_at_eos=True needs an eos_token_id (the tokenizer has none)")
        generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        cache = self.empty_cache() if use_past_kv_cache else None
        step_input, step_mask = tokens, attention_mask
        for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            if cache is None:
                step_input = tokens
                if attention_mask is not None:  # the whole sequence again: the mask grows with it
                    mask = torch.as_tensor(attention_mask).to(tokens.device)
                    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - mask.shape[1])], 1)
            logits = self(step_input, return_type="logits", cache=cache, attention_mask=step_mask)[:, -1]
            if cache is not None:
                step_mask = None  # only the prompt is padded
            next_token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if stop_at_eos:
                next_token = torch.where(finished, torch.full_like(next_token, eos), next_token)
                finished |= next_token == eos
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if stop_at_eos and bool(finished.all()):
                break
        if return_type == "tokens" or (return_type == "input" and isinstance(input, Tensor)):
            return tokens
        strings = self.to_string(tokens)
        return strings[0] if isinstance(input, str) and return_type == "input" else strings

    # ------------------------------------------------------------------ hooks
    def _enable_hook(self, name, hook, dir):
        self._check_hook_name(name)
        check_on_attach(self, hook)  # hooks built from an SAE check it against this model (hook_checks.py)
        return super()._enable_hook(name, keeping_activation_form(hook) if dir == "fwd" else hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        self._check_hook_name(name)
        check_on_attach(self, hook)
        hook = keeping_activation_form(hook) if dir == "fwd" else hook
        return super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _check_hook_name(self, name) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown hook point {name!r}.{hint} `model.hook_dict` lists all {len(self.hook_dict)} hook points; "
                "see the hook reference in docs/hooks.md."
            )
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"a hook name must be a string or a filter function, got {type(name).__name__}")

    def run_with_cache(self, *model_args, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       **kwargs):
        """As TransformerLens' ``HookedTransformer.run_with_cache``: ``(output, cache)`` where the cache is a
        ``transformer_lens.ActivationCache`` (``RecurrentActivationCache``, see ``hooking/activation_cache.py``), or
        the plain dict of activations with ``return_cache_object=False``."""
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        return out, RecurrentActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def hook_pos_axis(self, name: str) -> int:
        """The position axis of a hook's tensor (dim 1 for ``[batch, pos, ...]``, the query axis for patterns)."""
        return 2 if name.endswith(QUERY_AXIS_HOOKS) else 1

    def get_caching_hooks(
        self,
        names_filter=None,
        incl_bwd: bool = False,
        device=None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice=None,
    ):
        """As in transformer_lens, except that ``pos_slice`` slices each hook's real position axis and the sparse
        edit hooks (which carry no activation) are never cached."""
        from transformer_lens.utilities.slice import Slice

        cache = {} if cache is None else cache
        pos_slice = Slice.unwrap(pos_slice)
        wanted = _names_filter_fn(names_filter)
        self.is_caching = True

        def save(tensor: Tensor, hook: HookPoint, is_backward: bool = False):
            value = tensor.detach().to(device) if device is not None else tensor.detach()
            axis = self.hook_pos_axis(hook.name)
            if remove_batch_dim:
                value, axis = value[0], axis - 1
            if value.dim() > axis:
                value = pos_slice.apply(value, dim=axis)
            cache[hook.name + ("_grad" if is_backward else "")] = value

        fwd, bwd = [], []
        for name in self.hook_dict:
            if name.endswith(SPARSE_HOOK_NAMES) or not wanted(name):
                continue
            fwd.append((name, save))
            if incl_bwd:
                bwd.append((name, lambda t, hook: save(t, hook, is_backward=True)))
        return cache, fwd, bwd

    # ------------------------------------------------------------------ devices
    def _apply(self, fn, *args, **kwargs):
        """Every move or cast (``to``, ``half``, ``float``, ``double``, ``bfloat16``, ``cuda``, ``cpu``) goes through
        here: afterwards ``cfg.device`` and ``cfg.dtype`` are those of the embedding."""
        out = super()._apply(fn, *args, **kwargs)
        first = next(self.parameters(), None)
        if first is not None and hasattr(self, "cfg"):
            self.cfg.device = str(first.device)
            self.cfg.dtype = first.dtype
        return out

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U


def next_token_loss(logits: Tensor, tokens: Tensor, per_token: bool = False) -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (fp32)."""
    return masked_next_token_loss(logits, tokens, per_token=per_token)


def _names_filter_fn(names_filter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set)):
        allowed = set(names_filter)
        return lambda name: name in allowed
    if callable(names_filter):
        return names_filter
    raise ValueError("names_filter must be None, a string, a list of strings, or a function of the hook name")
