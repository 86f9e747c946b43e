"""Many edited continuations of a few passages, batched: the engine of the substitution test.

Per group of passages, one batched native pass from the edited layer (its input was kept by the scan, so earlier
layers never run again) gives the native next-token distributions where KLs are read and keeps, per passage, cache
snapshots at the positions its edited rows start from (states only there, from the chunked algebra). Then rows
(firing x condition), from any number of passages, run together: each row starts from its own snapshot with its edit
applied, runs only the positions up to where its KL is read, and shares its passage's attention keys instead of
copying them. Only the final residual at each row's read position goes through the unembedding.

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


def check_run_options(timing: str, kl_at: str) -> None:
    """Clear errors for an unknown edit timing or KL read-out."""
    if timing not in TIMING_HOOKS:
        raise ValueError(f"timing must be one of {sorted(TIMING_HOOKS)}, got {timing!r}")
    if kl_at not in ("next", "end"):
        raise ValueError(f"kl_at must be 'next' or 'end', got {kl_at!r}")


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
    p_condition), ``kl_{condition}_rev``, ``top1_{condition}`` and ``top1_native``.
    """

    def __init__(self, model, layer: int, head: int, timing: str, kl_at: str, batch_size: int, progress=None) -> None:
        check_run_options(timing, kl_at)
        self.model, self.layer, self.head, self.timing, self.kl_at = model, layer, head, timing, kl_at
        self.batch_size = max(1, batch_size)
        self.progress = progress  # a tqdm bar advanced by firing positions done, or None
        self.pending: list[_Rows] = []
        self.results: dict[tuple[int, int], dict] = {}

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
        starts = [sorted({self.start_position(t) for t in edits}) for _, _, edits in group]
        reads = [sorted({self.read_position(t, n_pos) for t in edits}) for _, _, edits in group]
        snapshot_cache, natives = self._native_pass([inputs for _, inputs, _ in group], starts, reads)
        for row, (passage, inputs, edits) in enumerate(group):
            snapshot_of = {s: i for i, s in enumerate(starts[row])}
            read_of = {r: i for i, r in enumerate(reads[row])}
            rows = [(t, condition) for t in sorted(edits) for condition in edits[t]]
            while rows:
                room = self.batch_size - self._pending_rows()
                piece, rows = rows[:room], rows[room:]
                row_starts = [self.start_position(t) for t, _ in piece]
                row_reads = [self.read_position(t, n_pos) for t, _ in piece]
                span = max(r - s for s, r in zip(row_starts, row_reads)) + 1
                streams = {name: torch.stack([_padded(x[s : s + span], span) for s in row_starts])
                           for name, x in self._streams(inputs).items()}
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
        """The inputs a run from the layer takes: the residual stream and the family's carried streams."""
        return {name: inputs[name] for name in ("resid", *self.model.carried_streams)}

    def _logits(self, final_resid: Tensor) -> Tensor:
        """Logits [n, d_vocab] from final residuals [n, d_model]."""
        return self.model.unembed(self.model.ln_final(final_resid[:, None]))[:, 0]

    def _final_logp(self, final_resid: Tensor) -> Tensor:
        """Log-probabilities (fp64, so that KLs of 1e-7 stay positive) from final residuals [n, d_model]."""
        return F.log_softmax(self._logits(final_resid).double(), dim=-1)

    def _run(self, streams: dict[str, Tensor], cache: RecurrentCache, final_positions: Tensor | None = None) -> Tensor:
        """Final residual stream [batch, pos, d_model] of a run from the layer on (only at ``final_positions``
        [batch, n_sel] when given: [batch, n_sel, d_model])."""
        # carried streams are inputs only of runs that start after the first layer (the first computes them)
        carried = {name: streams[name] for name in self.model.carried_streams} if self.layer > 0 else {}
        return self.model(streams["resid"], start_at_layer=self.layer, stop_at_layer=self.model.cfg.n_layers,
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

    def _kls(self, batch: list[_Rows], logits: Tensor) -> tuple[list[float], list[float]]:
        """Both KLs of every row of the batch (rows in order), in blocks of rows (memory and page faults stay small
        for any vocabulary)."""
        block = _kl_block_rows(logits.shape[-1], logits.device)
        kl, kl_rev, first = [], [], 0
        for r in batch:
            index = r.read_index.to(r.native.logp.device)
            for lo in range(0, len(index), block):
                at = index[lo : lo + block]
                rows = logits[first + lo : first + lo + len(at)]
                forward, reverse = kl_both_directions(r.native.logp[at], r.native.prob[at], rows)
                kl += forward.tolist()
                kl_rev += reverse.tolist()
            first += len(index)
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
            # the rows' states were just gathered from the snapshots (a new tensor): edited in place
            cache.layers[self.layer]["state"][:, self.head] += matrices.to(cache.layers[self.layer]["state"])
            hooks = []
        else:  # part of the write at the row's first position
            cells = torch.tensor([[r, 0, self.head] for r in range(n_rows)])

            def add(x: Tensor, hook) -> Tensor:
                return x + torch.sparse_coo_tensor(cells.T.to(x.device), matrices.to(x.device), x.shape,
                                                   check_invariants=False)

            hooks = [(mixer_hook(self.layer, TIMING_HOOKS["write"]), add)]
        with self.model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():  # no hooks: no teardown
            final = self._run(streams, cache)
        read_offset = torch.cat([r.read_offset for r in batch]).to(final.device)
        logits = self._logits(final[torch.arange(n_rows, device=final.device), read_offset])  # [rows, d_vocab]
        top1_native = [r.native.top1[i] for r in batch for i in r.read_index.tolist()]
        kl, kl_rev = self._kls(batch, logits)
        top1 = logits.argmax(-1).tolist()

        labels = [label for r in batch for label in r.labels]
        done = 0
        for i, (passage, t, condition) in enumerate(labels):
            entry = self.results.get((passage, t))
            if entry is None:
                entry = self.results[(passage, t)] = {"top1_native": top1_native[i]}
                done += 1
            entry[f"kl_{condition}"] = kl[i]
            entry[f"kl_{condition}_rev"] = kl_rev[i]
            entry[f"top1_{condition}"] = top1[i]
        if self.progress is not None:
            self.progress.update(done)


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
    """One cache for the rows of a batch, in order: gathered once per native pass they come from."""
    groups: list[list[_Rows]] = []
    for rows in batch:  # consecutive pieces of one native pass share its snapshot cache
        if groups and groups[-1][0].snapshots is rows.snapshots:
            groups[-1].append(rows)
        else:
            groups.append([rows])
    return RecurrentCache.stack_rows([
        group[0].snapshots.rows_from_snapshots(torch.cat([r.snapshot_index for r in group]),
                                               torch.cat([r.snapshot_row for r in group]))
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
