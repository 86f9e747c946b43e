"""One batched generation engine for cache-edit protocols: rows of one batched decode, each with its own prompt,
its own cache edits and pushes, and its own sampler.

    result = generate_rows(model, prompts, max_new_tokens=20, edits=[CacheEdit(...), ...], pushes=[Push(...)])

Rows (prompts x conditions x targets) are left-padded into batches of ``batch_size`` (rows of similar length
together); the prompt runs once per row and each new token costs one step of every layer (O(1) work in the recurrent
layers, the KV cache in attention layers). Edits at prompt positions are applied in the prompt's forward pass,
edits at generated positions in the decoding step that processes that position, and pushes at every decoding step,
all as sparse additions to the state after the read (``hook_post_read_add``), with the native write factors they
need read in the same pass (``edits.py``). Hooks the caller installs (``model.hooks(...)``) stay active throughout.

Greedy decoding takes the arg max; sampling draws from ``softmax(logits / temperature)`` with one
``torch.Generator`` per row seeded by ``seeds[row]``, so a row's samples do not depend on the batch it runs in. Every
row generates what the same prompt, edits and seed give alone (tests: token for token in fp32, and against the naive
reference: the whole sequence re-run with ``interventions.add_to_state`` at every step).

Precision (issue #18). With ``precision="float32"`` (the default) the layers from ``tail_from`` on (default: the
lowest edited or pushed layer; 0 without edits), the final norm and the unembedding run in float32 whatever the
model's dtype (``evaluation.tail_precision``: a float32 copy of those modules beside the model; a float32 or
float64 model runs as it is, so nothing changes there). A single write's effect on the log-probabilities is far
below what bfloat16 layers resolve; every row (native or edited) of a call goes through that same computation.
Families with carried streams (RWKV-7) run from layer 0 in float32 (``tail_precision.full_run_start``).
``precision="model"`` keeps the model's dtype. Hooks the caller installs on the model's modules from ``tail_from``
on act only when nothing is converted (a float32 model, or ``precision="model"``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..evaluation.tail_precision import check_precision, comparison_model, full_run, full_run_start
from ..interventions import mixer_hook
from .edits import CacheEdit, Push, check_edit, edit_matrices, stacked


@dataclass
class GenerationResult:
    """``tokens`` [rows, new] generated ids; ``watch_logp`` / ``watch_rank`` [rows, new, n_watch]: the log-probability
    and rank (1 = top) of each watched token in the distribution each generated token was drawn from (NaN / -1 where
    no token is watched); ``first_logprobs`` [rows, d_vocab]: the whole first distribution, when asked for."""

    tokens: Tensor
    watch_logp: Tensor | None = None
    watch_rank: Tensor | None = None
    first_logprobs: Tensor | None = None


@torch.no_grad()
def generate_rows(
    model,
    prompts: list[Tensor],
    *,
    max_new_tokens: int,
    edits: list[CacheEdit] = (),
    pushes: list[Push] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    seeds: list[int] | None = None,
    watch: Tensor | None = None,
    watch_steps: int | None = None,
    keep_first_logprobs: bool = False,
    batch_size: int = 256,
    progress: bool = False,
    precision: str = "float32",
    tail_from: int | None = None,
) -> GenerationResult:
    """Generate ``max_new_tokens`` tokens for every row (see the module docstring).

    ``prompts``: one 1-D token tensor per row. ``watch`` [rows, n_watch] (long, -1 = none): tokens whose log-prob and
    rank are recorded at every step (or the first ``watch_steps``; NaN / -1 after). ``seeds`` (sampling only): one
    per row. ``precision`` and ``tail_from``: see the module docstring (analyses pass their edited layer, so that
    their native rows run through the same computation as the edited ones)."""
    rows = _checked_prompts(model, prompts)
    n_rows = len(rows)
    _check_options(max_new_tokens, do_sample, temperature, seeds, n_rows, batch_size)
    lengths = [len(p) for p in rows]
    by_row_edits: dict[int, list[CacheEdit]] = defaultdict(list)
    for edit in edits:
        _check_cell(model, edit.row, edit.layer, edit.head, n_rows)
        check_edit(edit, model.cfg.d_k, model.cfg.d_v)
        # the output of the last prompt position and of each fed token but the last are read: an edit after the
        # read at s reaches them only when s is before the last of those positions (len + max_new_tokens - 2)
        last = lengths[edit.row] + max_new_tokens - 3
        if not 0 <= edit.position <= last:
            raise ValueError(f"edit position {edit.position} of row {edit.row} is past what is generated: valid "
                             f"positions are 0..{last} (prompt of {lengths[edit.row]} tokens, {max_new_tokens} new)")
        by_row_edits[edit.row].append(edit)
    by_row_pushes: dict[int, list[Push]] = defaultdict(list)
    for push in pushes:
        _check_cell(model, push.row, push.layer, push.head, n_rows)
        if tuple(push.matrix.shape) != (model.cfg.d_k, model.cfg.d_v) or not bool(torch.isfinite(push.matrix).all()):
            raise ValueError(f"push matrices must be finite [d_k, d_v] = [{model.cfg.d_k}, {model.cfg.d_v}]; got "
                             f"{tuple(push.matrix.shape)} for row {push.row}")
        by_row_pushes[push.row].append(push)
    if watch is not None:
        watch = torch.as_tensor(watch, dtype=torch.long)
        if watch.dim() != 2 or watch.shape[0] != n_rows:
            raise ValueError(f"watch must be [rows={n_rows}, n_watch] token ids (-1 = none); got {tuple(watch.shape)}")
        if watch.numel() and int(watch.max()) >= model.cfg.d_vocab:
            raise ValueError(f"watched tokens must be < d_vocab = {model.cfg.d_vocab}; got {int(watch.max())}")

    runner, start_layer = _runner(model, precision, tail_from, [*edits, *pushes])

    order = sorted(range(n_rows), key=lambda r: lengths[r])  # similar lengths together: little padding
    tokens = torch.empty(n_rows, max_new_tokens, dtype=torch.long)
    n_watch = watch.shape[1] if watch is not None else 0
    watch_logp = torch.full((n_rows, max_new_tokens, n_watch), float("nan")) if watch is not None else None
    watch_rank = torch.full((n_rows, max_new_tokens, n_watch), -1, dtype=torch.long) if watch is not None else None
    first = torch.empty(n_rows, model.cfg.d_vocab) if keep_first_logprobs else None
    bar = tqdm(total=n_rows, desc="generate", disable=not progress)
    with full_run(model, runner, start_layer):
        for start in range(0, n_rows, batch_size):
            chunk = order[start : start + batch_size]
            out = _generate_batch(runner, [rows[r] for r in chunk], max_new_tokens,
                                  [by_row_edits.get(r, []) for r in chunk], [by_row_pushes.get(r, []) for r in chunk],
                                  do_sample, temperature, [seeds[r] for r in chunk] if seeds is not None else None,
                                  watch[chunk] if watch is not None else None, watch_steps, keep_first_logprobs)
            index = torch.tensor(chunk)
            tokens[index] = out.tokens
            if watch is not None:
                watch_logp[index], watch_rank[index] = out.watch_logp, out.watch_rank
            if first is not None:
                first[index] = out.first_logprobs
            bar.update(len(chunk))
    bar.close()
    return GenerationResult(tokens, watch_logp, watch_rank, first)


def _runner(model, precision: str, tail_from: int | None, cells: list) -> tuple[object, int]:
    """The model a call runs (``model`` or its float32-tail copy) and the first layer of its float32 part."""
    check_precision(precision)
    lowest = min((c.layer for c in cells), default=None)
    if tail_from is None:
        tail_from = 0 if lowest is None else lowest
    if not isinstance(tail_from, int) or not 0 <= tail_from < model.cfg.n_layers:
        raise ValueError(f"tail_from must be a layer 0..{model.cfg.n_layers - 1}, got {tail_from!r}")
    if lowest is not None and tail_from > lowest:
        raise ValueError(f"tail_from={tail_from} is after the lowest edited layer {lowest}: the edited layers must "
                         "run in the comparison precision")
    start = full_run_start(model, tail_from)
    return comparison_model(model, start, precision), start


def _generate_batch(model, prompts, max_new_tokens, edits, pushes, do_sample, temperature, seeds, watch,
                    watch_steps, keep_first) -> GenerationResult:
    device = model.cfg.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    pads = width - lengths
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens[b, int(pads[b]):] = prompt
    mask = torch.arange(width)[None, :] >= pads[:, None]
    generators = None
    if do_sample:
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    # which call applies each edit: the prompt's (call -1, at its padded index) or decoding step j (position len + j)
    calls: dict[int, list[tuple[int, int, CacheEdit]]] = defaultdict(list)
    for b, row_edits in enumerate(edits):
        for e in row_edits:
            if e.position < lengths[b]:
                calls[-1].append((b, e.position + int(pads[b]), e))
            else:
                calls[e.position - int(lengths[b])].append((b, 0, e))
    push_cells = [(b, 0, p) for b, row_pushes in enumerate(pushes) for p in row_pushes]

    cache = model.empty_cache()
    with model.hooks(fwd_hooks=edit_hooks(model, calls.get(-1, []), [])):
        last = torch.full((batch, 1), width - 1, dtype=torch.long, device=device)  # logits only where needed
        logits = model(tokens.to(device), attention_mask=mask.to(device), cache=cache, final_positions=last)[:, -1]
    out_tokens = torch.empty(batch, max_new_tokens, dtype=torch.long)
    n_watch = watch.shape[1] if watch is not None else 0
    watch_logp = torch.full((batch, max_new_tokens, n_watch), float("nan"))
    watch_rank = torch.full((batch, max_new_tokens, n_watch), -1, dtype=torch.long)
    first = None
    for step in range(max_new_tokens):
        logits = logits.float()
        watching = watch is not None and (watch_steps is None or step < watch_steps)
        if watching or (keep_first and step == 0):
            logp = torch.log_softmax(logits, dim=-1)
            if keep_first and step == 0:
                first = logp.cpu()
            if watching:
                watch_logp[:, step], watch_rank[:, step] = _watched(logits, logp, watch.to(logits.device))
        chosen = _choose(logits, do_sample, temperature, generators)  # [batch]
        out_tokens[:, step] = chosen.cpu()
        if step == max_new_tokens - 1:
            break
        with model.hooks(fwd_hooks=edit_hooks(model, calls.get(step, []), push_cells)):
            logits = model(chosen[:, None].to(device), cache=cache)[:, -1]
    return GenerationResult(out_tokens, watch_logp, watch_rank, first)


def _watched(logits: Tensor, logp: Tensor, watch: Tensor) -> tuple[Tensor, Tensor]:
    """log p and rank (1 + the number of tokens with a larger logit) of the watched tokens; NaN / -1 at -1 entries."""
    valid = watch >= 0
    safe = watch.clamp_min(0)
    picked_logit = logits.gather(1, safe)  # [batch, n_watch]
    rank = 1 + (logits[:, None, :] > picked_logit[:, :, None]).sum(-1)
    logp_w = logp.gather(1, safe).masked_fill(~valid, float("nan"))
    return logp_w.cpu(), rank.masked_fill(~valid, -1).cpu()


def _choose(logits: Tensor, do_sample: bool, temperature: float, generators) -> Tensor:
    if not do_sample or temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


def edit_hooks(model, cells: list[tuple[int, int, CacheEdit]], push_cells: list[tuple[int, int, Push]]) -> list:
    """The hooks of one forward call: per edited layer, capture the native write factors at the edited cells and add
    the edit matrices (and the pushes) after the read."""
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    by_layer: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for b, pos, e in cells:
        by_layer[e.layer][0].append((b, pos, e))
    for b, pos, p in push_cells:
        by_layer[p.layer][1].append((b, pos, p))
    hooks = []
    for layer, (edit_cells, pushed) in by_layer.items():
        hooks.extend(_layer_hooks(layer, edit_cells, pushed, d_k, d_v))
    return hooks


def _layer_hooks(layer: int, edit_cells: list, pushed: list, d_k: int, d_v: int) -> list:
    native: dict[str, Tensor] = {}
    index = torch.tensor([(b, pos, e.head) for b, pos, e in edit_cells], dtype=torch.long).reshape(-1, 3)
    spec = stacked([e for _, _, e in edit_cells], d_k, d_v) if edit_cells else None
    push_index = torch.tensor([(b, pos, p.head) for b, pos, p in pushed], dtype=torch.long).reshape(-1, 3)
    push_matrices = torch.stack([p.matrix.float() for _, _, p in pushed]) if pushed else None

    def capture(name: str):
        def hook(x: Tensor, hook) -> None:
            b, p, h = index.T.to(x.device)
            native[name] = x[b, p, h].detach().float()
        return hook

    def add(sparse: Tensor, hook) -> Tensor:
        parts_index, parts_values = [], []
        if spec is not None:
            device = sparse.device
            matrices = edit_matrices(spec["keys"].to(device), spec["values"].to(device), spec["scales"].to(device),
                                     spec["relative"].to(device), native["k"], native["v"], native["beta"])
            parts_index.append(index.T.to(device))
            parts_values.append(matrices)
        if push_matrices is not None:
            parts_index.append(push_index.T.to(sparse.device))
            parts_values.append(push_matrices.to(sparse.device))
        added = torch.sparse_coo_tensor(torch.cat(parts_index, 1), torch.cat(parts_values), sparse.shape,
                                        check_invariants=False)
        return sparse + added

    hooks = []
    if spec is not None:
        hooks += [(mixer_hook(layer, "hook_write_k"), capture("k")), (mixer_hook(layer, "hook_write_v"), capture("v")),
                  (mixer_hook(layer, "hook_write_beta"), capture("beta"))]
    return hooks + [(mixer_hook(layer, "hook_post_read_add"), add)]


def _checked_prompts(model, prompts) -> list[Tensor]:
    if isinstance(prompts, Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    if not prompts:
        raise ValueError("no prompts: give one 1-D token tensor per row")
    rows = []
    for i, prompt in enumerate(prompts):
        prompt = torch.as_tensor(prompt)
        if prompt.dim() != 1 or prompt.numel() == 0 or prompt.is_floating_point():
            raise ValueError(f"prompt {i} must be a non-empty 1-D integer token tensor; got {prompt.dtype} "
                             f"{tuple(prompt.shape)}")
        if int(prompt.min()) < 0 or int(prompt.max()) >= model.cfg.d_vocab:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary 0..{model.cfg.d_vocab - 1}")
        rows.append(prompt.long().cpu())
    return rows


def _check_options(max_new_tokens, do_sample, temperature, seeds, n_rows, batch_size) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if do_sample:
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        if seeds is None or len(seeds) != n_rows:
            raise ValueError(f"sampling needs one seed per row ({n_rows} rows), so that a row's samples do not "
                             f"depend on its batch; got {None if seeds is None else len(seeds)}")


def _check_cell(model, row: int, layer: int, head: int, n_rows: int) -> None:
    if not 0 <= row < n_rows:
        raise ValueError(f"row {row} is out of range; there are {n_rows} rows")
    if not (0 <= layer < model.cfg.n_layers and hasattr(model.blocks[layer], "mixer")):
        recurrent = [i for i, b in enumerate(model.blocks) if hasattr(b, "mixer")]
        raise ValueError(f"layer {layer} is not a recurrent layer; recurrent layers: {recurrent}")
    if not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head} is out of range; valid heads are 0..{model.cfg.n_heads - 1}")
