"""Many edited continuations of a few passages, batched: the engine of the substitution test.

Per group of passages, one batched native pass from the edited layer (its input was kept by the scan, so earlier
layers never run again) keeps, per passage, cache snapshots at the positions its edited rows start from (states only
there, from the chunked algebra). Then rows (firing x condition), from any number of passages, run together: each row
starts from its own snapshot with its edit applied, runs only the positions up to where its KL is read, and shares
its passage's attention keys instead of copying them; a firing's rows share their snapshot's matrix states too
(``ops.shared_step``: a one-token row needs no state of its own). Only the final residual at each row's read
position goes through the unembedding.

The native reference (``reference="row"``, the default) is one more row per firing, with no edit, in the same batch as
the firing's conditions: the reference and the conditions go through the same computation, so rounding that the row
path adds cancels instead of flooring every KL. The native pass's distribution at the same read position is a second,
differently computed native distribution: the KL between the two (``kl_floor``) is the run's numerical floor, the size
of an effect the arithmetic cannot tell from rounding. ``reference="pass"`` is the earlier protocol (the KLs against
the native pass, no native rows; ``kl_floor`` is then NaN), kept to measure what the change buys.

``precision`` (``tail_precision.py``): ``"float32"`` runs the native pass and the rows from the edited layer on in
float32 whatever the model's dtype (a float32 or float64 model is used as it is); ``"model"`` in the model's dtype.

Edit timing: ``"after_read"`` adds the edit to the cached state after position t was read, so rows start at t + 1;
``"write"`` adds it to the write at t, so rows start at t. ``kl_at``: ``"next"`` reads the KL at the row's first
position, ``"end"`` at the passage's last (the tokens in between teacher-forced).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hooking.cache import RecurrentCache
from ..interventions import TIMING_HOOKS, mixer_hook
from .tail_precision import as_tail_input, check_precision, comparison_model

REFERENCES = ("row", "pass")
NATIVE = "native"  # the label of a firing's unedited row


def check_run_options(timing: str, kl_at: str, precision: str = "float32", reference: str = "row") -> None:
    """Clear errors for an unknown edit timing, KL read-out, comparison precision or native reference."""
    if timing not in TIMING_HOOKS:
        raise ValueError(f"timing must be one of {sorted(TIMING_HOOKS)}, got {timing!r}")
    if kl_at not in ("next", "end"):
        raise ValueError(f"kl_at must be 'next' or 'end', got {kl_at!r}")
    check_precision(precision)
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")


@dataclass
class _NativeReads:
    """The native next-token distributions at one passage's read positions."""

    logp: Tensor  # [n_reads, d_vocab] fp64
    prob: Tensor  # exp(logp)
    top1: list[int]


@dataclass
class _Rows:
    """Rows of one passage, ready to join a batch."""

    snapshots: RecurrentCache  # the native pass's cache holding the passage's snapshots
    snapshot_index: Tensor  # [rows]: the snapshot each row starts from
    snapshot_row: Tensor  # [rows]: the passage's batch row in ``snapshots``
    inputs: dict[str, Tensor]  # "resid" and carried streams, [rows, span, ...]
    matrices: Tensor  # [rows, d_k, d_v]: added to the head's state (after_read) or write (write)
    read_offset: Tensor  # [rows]: where in its span each row's KL is read
    native: _NativeReads  # of the rows' passage
    read_index: Tensor  # [rows]: each row's read position, as an index into ``native``
    labels: list[tuple[int, int, str]]  # (passage, position, condition)


class EditedRuns:
    """Collects edited rows passage by passage and runs them in batches of at most ``batch_size`` rows.

    ``add([(passage, inputs, edits), ...])`` with ``edits[t][condition] = matrix`` queues a group of passages (one
    native pass); after ``finish()``, ``results[(passage, t)]`` holds ``kl_{condition}`` = KL(p_native ||
    p_condition), ``kl_{condition}_rev``, ``top1_{condition}``, ``top1_native`` and ``kl_floor`` (module docstring).
    A firing's rows (its native row and its conditions) run in one batch whenever ``batch_size`` holds them.
    """

    def __init__(self, model, layer: int, head: int, timing: str, kl_at: str, batch_size: int, progress=None,
                 precision: str = "float32", reference: str = "row") -> None:
        check_run_options(timing, kl_at, precision, reference)
        self.model, self.layer, self.head, self.timing, self.kl_at = model, layer, head, timing, kl_at
        self.reference = reference
        self.runner = comparison_model(model, layer, precision)  # what runs from the layer on
        self.dtype = next(self.runner.blocks[layer].parameters()).dtype
        self.batch_size = max(1, batch_size)
        self.progress = progress  # a tqdm bar advanced by firing positions done, or None
        self.pending: list[_Rows] = []
        self.results: dict[tuple[int, int], dict] = {}
        # (passage, t) -> (log p, p) of the firing's native row, fp64, until its last condition row is done
        self._row_natives: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self._rows_left: dict[tuple[int, int], int] = {}

    def start_position(self, t: int) -> int:
        """The first position an edited row runs: t + 1 after the read, t for a write edit."""
        return t + 1 if self.timing == "after_read" else t

    def read_position(self, t: int, n_pos: int) -> int:
        return self.start_position(t) if self.kl_at == "next" else n_pos - 1

    # ---- adding passages ------------------------------------------------------------------------------------------
    def add(self, group: list[tuple[int, dict[str, Tensor], dict[int, dict[str, Tensor]]]]) -> None:
        """Queue the rows of a group of passages, each ``(passage, inputs, edits)`` with its scan inputs ([pos, ...]
        per stream, the same length for all) and ``edits[t][condition] = matrix``. One native pass runs the group."""
        n_pos = group[0][1]["resid"].shape[0]
        group = [(passage, self._streams(inputs), edits) for passage, inputs, edits in group]
        starts = [sorted({self.start_position(t) for t in edits}) for _, _, edits in group]
        reads = [sorted({self.read_position(t, n_pos) for t in edits}) for _, _, edits in group]
        snapshot_cache, natives = self._native_pass([inputs for _, inputs, _ in group], starts, reads)
        for row, (passage, inputs, edits) in enumerate(group):
            snapshot_of = {s: i for i, s in enumerate(starts[row])}
            read_of = {r: i for i, r in enumerate(reads[row])}
            if self.reference == "row":  # the firing's unedited row first, then its conditions
                edits = {t: {NATIVE: torch.zeros_like(next(iter(edits[t].values()))), **edits[t]} for t in edits}
                self._rows_left.update({(passage, t): len(edits[t]) - 1 for t in edits})
            rows = [(t, condition) for t in sorted(edits) for condition in edits[t]]
            while rows:
                room = self.batch_size - self._pending_rows()
                first_firing = len(edits[rows[0][0]])
                if first_firing > room and self.pending and first_firing <= self.batch_size:
                    self._flush()  # keep a firing's rows in one batch: the same computation for all of them
                    room = self.batch_size
                # whole firings only, unless a firing alone exceeds batch_size
                whole = [i + 1 for i in range(min(room, len(rows)))
                         if i + 1 == len(rows) or rows[i + 1][0] != rows[i][0]]
                take = whole[-1] if whole else room
                piece, rows = rows[:take], rows[take:]
                row_starts = [self.start_position(t) for t, _ in piece]
                row_reads = [self.read_position(t, n_pos) for t, _ in piece]
                span = max(r - s for s, r in zip(row_starts, row_reads)) + 1
                streams = {name: torch.stack([_padded(x[s : s + span], span) for s in row_starts])
                           for name, x in inputs.items()}
                which = torch.tensor([snapshot_of[s] for s in row_starts])
                self.pending.append(_Rows(
                    snapshots=snapshot_cache,
                    snapshot_index=which,
                    snapshot_row=torch.full_like(which, row),
                    inputs=streams,
                    matrices=torch.stack([edits[t][condition] for t, condition in piece]),
                    read_offset=torch.tensor([r - s for s, r in zip(row_starts, row_reads)]),
                    native=natives[row],
                    read_index=torch.tensor([read_of[r] for r in row_reads]),
                    labels=[(passage, t, condition) for t, condition in piece],
                ))
                if self._pending_rows() >= self.batch_size:
                    self._flush()

    def _pending_rows(self) -> int:
        return sum(len(r.labels) for r in self.pending)

    def finish(self) -> None:
        if self.pending:
            self._flush()

    def _streams(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inputs a run from the layer takes: the residual stream and the family's carried streams, in the
        dtype the layers from the edited one on run in."""
        return {name: as_tail_input(inputs[name], self.dtype) for name in ("resid", *self.model.carried_streams)}

    def _logits(self, final_resid: Tensor) -> Tensor:
        """Logits [n, d_vocab] from final residuals [n, d_model]."""
        return self.runner.unembed(self.runner.ln_final(final_resid[:, None]))[:, 0]

    def _final_logp(self, final_resid: Tensor) -> Tensor:
        """Log-probabilities (fp64, so that KLs of 1e-7 stay positive) from final residuals [n, d_model]."""
        return F.log_softmax(self._logits(final_resid).double(), dim=-1)

    def _run(self, streams: dict[str, Tensor], cache: RecurrentCache, final_positions: Tensor | None = None) -> Tensor:
        """Final residual stream [batch, pos, d_model] of a run from the layer on (only at ``final_positions``
        [batch, n_sel] when given: [batch, n_sel, d_model])."""
        # carried streams are inputs only of runs that start after the first layer (the first computes them)
        carried = {name: streams[name] for name in self.model.carried_streams} if self.layer > 0 else {}
        return self.runner(streams["resid"], start_at_layer=self.layer, stop_at_layer=self.model.cfg.n_layers,
                           cache=cache, final_positions=final_positions, **carried)

    def _native_pass(self, inputs: list[dict[str, Tensor]], starts: list[list[int]], reads: list[list[int]]):
        """One batched run of the passages from the layer: the cache with every passage's snapshots at its ``starts``
        (batch row i = passage i; a short list is padded by repeating its last position) and each passage's native
        log-probabilities at its ``reads``. Only the positions some row needs are run."""
        needed = max(max(max(r) + 1, max(s)) for s, r in zip(starts, reads))
        cache = self.model.empty_cache()
        cache.request_snapshots(_padded_rows(starts), range(self.layer, self.model.cfg.n_layers))
        streams = {name: torch.stack([x[name][:needed] for x in inputs]) for name in self._streams(inputs[0])}
        final = self._run(streams, cache, _padded_rows(reads))  # [passages, most reads, d_model]
        natives = []
        for row, r in enumerate(reads):
            logp = self._final_logp(final[row, : len(r)])
            natives.append(_NativeReads(logp, logp.exp(), logp.argmax(-1).tolist()))
        return cache, natives

    def _kls(self, logits: Tensor, references: list[tuple[Tensor, Tensor]]) -> tuple[list[float], list[float]]:
        """KL(reference || row) and KL(row || reference) of each row of ``logits`` [n, d_vocab] against its reference
        ``(log p, p)`` (fp64 [d_vocab] each), in blocks of rows (memory and page faults stay small for any
        vocabulary)."""
        block = _kl_block_rows(logits.shape[-1], logits.device)
        kl, kl_rev = [], []
        for lo in range(0, len(references), block):
            refs = references[lo : lo + block]
            forward, reverse = kl_both_directions(torch.stack([r[0] for r in refs]), torch.stack([r[1] for r in refs]),
                                                  logits[lo : lo + len(refs)])
            kl += forward.tolist()
            kl_rev += reverse.tolist()
        return kl, kl_rev

    # ---- running a batch ------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        span = max(r.inputs["resid"].shape[1] for r in batch)
        streams = {name: torch.cat([_padded(r.inputs[name], span, dim=1) for r in batch]) for name in batch[0].inputs}
        cache = _rows_cache(batch)
        matrices = torch.cat([r.matrices for r in batch])
        n_rows = len(matrices)

        if self.timing == "after_read":  # a change of the cached state: no hook needed
            cache.add_to_state(self.layer, self.head, matrices)
            hooks = []
        else:  # part of the write at the row's first position
            cells = torch.tensor([[r, 0, self.head] for r in range(n_rows)])

            def add(x: Tensor, hook) -> Tensor:
                return x + torch.sparse_coo_tensor(cells.T.to(x.device), matrices.to(x.device), x.shape,
                                                   check_invariants=False)

            hooks = [(mixer_hook(self.layer, TIMING_HOOKS["write"]), add)]
        with self.runner.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():  # no hooks: no teardown
            final = self._run(streams, cache)
        read_offset = torch.cat([r.read_offset for r in batch]).to(final.device)
        logits = self._logits(final[torch.arange(n_rows, device=final.device), read_offset])  # [rows, d_vocab]
        top1 = logits.argmax(-1).tolist()
        labels = [label for r in batch for label in r.labels]
        # each row's native distribution from the native pass at its read position
        from_pass = [(r.native, int(i)) for r in batch for i in r.read_index.tolist()]
        done = 0
        for i, (passage, t, _) in enumerate(labels):
            if (passage, t) not in self.results:
                self.results[(passage, t)] = {"top1_native": from_pass[i][0].top1[from_pass[i][1]],
                                              "kl_floor": float("nan")}
                done += 1
        if self.reference == "row":
            native = [i for i, label in enumerate(labels) if label[2] == NATIVE]
            for i in native:
                logp = torch.log_softmax(logits[i].double(), dim=-1)
                self._row_natives[labels[i][:2]] = (logp, logp.exp())
                self.results[labels[i][:2]]["top1_native"] = top1[i]
            # the floor: the native pass's distribution against the native row's (two computations of one thing)
            floor, floor_rev = self._kls(logits[native], [_pass_read(*from_pass[i]) for i in native])
            for i, a, b in zip(native, floor, floor_rev):
                self.results[labels[i][:2]]["kl_floor"] = max(a, b)
            rows = [i for i, label in enumerate(labels) if label[2] != NATIVE]
            references = [self._row_natives[labels[i][:2]] for i in rows]
        else:
            rows = list(range(n_rows))
            references = [_pass_read(*from_pass[i]) for i in rows]
        kl, kl_rev = self._kls(logits[rows], references)
        for j, i in enumerate(rows):
            passage, t, condition = labels[i]
            entry = self.results[(passage, t)]
            entry[f"kl_{condition}"] = kl[j]
            entry[f"kl_{condition}_rev"] = kl_rev[j]
            entry[f"top1_{condition}"] = top1[i]
            if self.reference == "row":
                self._rows_left[(passage, t)] -= 1
                if self._rows_left[(passage, t)] == 0:  # the firing is done: its native row is no longer needed
                    del self._row_natives[(passage, t)], self._rows_left[(passage, t)]
        if self.progress is not None:
            self.progress.update(done)


def _pass_read(native: _NativeReads, index: int) -> tuple[Tensor, Tensor]:
    """``(log p, p)`` of the native pass at one of its read positions."""
    return native.logp[index], native.prob[index]


def _kl_block_rows(d_vocab: int, device: torch.device) -> int:
    """Rows per block of the fp64 KL arithmetic: about 1 MiB per [rows, d_vocab] temporary on CPU, where fresh
    large buffers cost a page fault per 4 KiB and small ones are reused; 256 MiB elsewhere."""
    budget = (1 << 20) if device.type == "cpu" else (256 << 20)
    return max(1, budget // (8 * d_vocab))


def kl_both_directions(native_logp: Tensor, native_prob: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(native || condition)`` and ``KL(condition || native)`` per row, in fp64, from the native log-probabilities
    [rows, d_vocab] (fp64) with their exponentials and the condition's logits [rows, d_vocab]. The plain formulas:

        logq = log_softmax(logits);  KL(p || q) = sum p (log p - log q);  KL(q || p) = sum q (log q - log p)

    computed in place on one fp64 copy of the logits and with batched dot products (on CPU an order of magnitude
    faster than the elementwise products and sums over the vocabulary, which allocate fresh memory per step)."""
    diff = torch.log_softmax(logits.double(), dim=-1)  # log q
    cond_prob = diff.exp()
    diff -= native_logp  # log q - log p
    rows_dot = lambda a, b: torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]  # noqa: E731
    return -rows_dot(native_prob, diff), rows_dot(cond_prob, diff)


def _rows_cache(batch: list[_Rows]) -> RecurrentCache:
    """One cache for the rows of a batch, in order: gathered once per native pass they come from. The rows of one
    firing share its snapshot's states (``ops.shared_step``: a one-token row needs no state of its own)."""
    groups: list[list[_Rows]] = []
    for rows in batch:  # consecutive pieces of one native pass share its snapshot cache
        if groups and groups[-1][0].snapshots is rows.snapshots:
            groups[-1].append(rows)
        else:
            groups.append([rows])
    return RecurrentCache.stack_rows([
        group[0].snapshots.rows_from_snapshots(torch.cat([r.snapshot_index for r in group]),
                                               torch.cat([r.snapshot_row for r in group]), shared_states=True)
        for group in groups
    ])


def _padded_rows(lists: list[list[int]]) -> Tensor:
    """Positions per row as one [rows, longest] tensor, a short row padded by repeating its last position."""
    longest = max(map(len, lists))
    return torch.tensor([x + x[-1:] * (longest - len(x)) for x in lists])


def _padded(x: Tensor, length: int, dim: int = 0) -> Tensor:
    """``x`` zero-padded at the end of ``dim`` to ``length`` (rows past a passage's end are padding, never read)."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
