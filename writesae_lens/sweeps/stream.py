"""Many cells trained from one activation stream: one model forward per batch of contexts feeds every cell's SAELens
trainer.

Each cell is prepared by the single-cell path itself (``pipeline.train_state_sae``), stopped at the moment SAELens'
runner would start training (``prepared_runner``): the runner it built (config, seeded SAE, activations store,
metadata) and the global random state at that moment are kept. Training then drives the cells in lockstep. Per batch
of contexts the stream runs the model once with a hook on every layer of the sweep and hands each cell its head's
states, sliced and flattened exactly as SAELens' ``ActivationsStore.get_activations`` does; each cell mixes them in
its own SAELens mixing buffer and steps its own ``SAETrainer`` under its own random state. So a cell trained in a
sweep is the cell trained alone (``tests/test_sweep_stream.py`` checks it in fp32), and the model runs once per
batch instead of once per cell and batch.

What the cells of one stream must share: the text, the context size, the contexts per model batch, the position
slice (``final_token_only``), the buffer and batch sizes (``stream_key``). Everything else (seed, architecture,
``d_sae``, ``k``, rank, layer, head) is per cell.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass
class RandomState:
    """The global torch random state (CPU, and the CUDA device when the cell trains there)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    cuda_index: int | None = None

    @classmethod
    def now(cls, device: torch.device) -> RandomState:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_index)


@dataclass
class PreparedCell:
    """One cell at the point its SAELens runner would start: the runner and the random state the single-cell path
    would train under."""

    name: str
    runner: object  # sae_lens.LanguageModelSAETrainingRunner
    random_state: RandomState
    documents_id: int = 0  # the text the runner reads (cells of one stream must read the same list)
    queue: deque = field(default_factory=deque)
    trainer: object | None = None  # sae_lens SAETrainer, once training starts

    @property
    def store(self):
        return self.runner.activations_store

    @property
    def hook_name(self) -> str:
        return self.runner.cfg.hook_name

    @property
    def head(self) -> int:
        return self.runner.cfg.hook_head_index

    @contextlib.contextmanager
    def own_random_state(self):
        """Within the block the global random state is this cell's; on leaving, the cell keeps where it got to."""
        self.random_state.restore()
        try:
            yield
        finally:
            self.random_state = RandomState.now(torch.device(self.runner.cfg.device))


@contextlib.contextmanager
def _runner_start_captured(replace_sae=None):
    """While active, SAELens' ``LanguageModelSAETrainingRunner.run`` trains nothing: it records the runner and the
    global random state it was called under and returns the untrained SAE. ``replace_sae(runner)``: an SAE to train
    instead of the runner's, drawn at that point from the same random state."""
    from sae_lens import LanguageModelSAETrainingRunner

    captured: list[tuple[object, RandomState]] = []
    original = LanguageModelSAETrainingRunner.__dict__["run"]

    def capture(runner):
        if replace_sae is not None:
            runner.sae = replace_sae(runner).to(runner.cfg.device)
            runner.cfg.sae = runner.sae.cfg
        captured.append((runner, RandomState.now(torch.device(runner.cfg.device))))
        return runner.sae

    LanguageModelSAETrainingRunner.run = capture
    try:
        yield captured
    finally:
        LanguageModelSAETrainingRunner.run = original


def prepare_cell(name: str, train, model, documents: list[str], settings, output: Path, device: str,
                 replace_sae=None) -> PreparedCell:
    """Run the single-cell path ``train(model, documents, settings, output, device=device)`` (``pipeline
    .train_state_sae`` or a function that ends in SAELens' runner the same way) up to the start of training; returns
    the runner it built and the random state training would start from. Nothing is trained or written.
    ``replace_sae(runner) -> TrainingSAE``: train this SAE instead (another architecture than the path's own)."""
    with _runner_start_captured(replace_sae) as captured:
        train(model, documents, settings, output, device=device)
    if len(captured) != 1:
        raise RuntimeError(f"{getattr(train, '__name__', train)} started {len(captured)} SAELens runners; "
                           "the sweep needs exactly one per cell")
    runner, state = captured[0]
    return PreparedCell(name=name, runner=runner, random_state=state, documents_id=id(documents))


def stream_key(cell: PreparedCell) -> tuple:
    """What cells must share to be fed by one stream (see module doc)."""
    store = cell.store
    cfg = cell.runner.cfg
    return (id(store.model), cell.documents_id, store.context_size, store.store_batch_size_prompts,
            tuple(store.seqpos_slice), store.n_batches_in_buffer, store.train_batch_size_tokens,
            store.activations_mixing_fraction, store.prepend_bos, store.autocast_lm, str(store.device),
            cfg.disable_concat_sequences, str(cfg.sequence_separator_token), cfg.training_tokens,
            repr(store.model_kwargs))


_EPOCH_END = object()


class SharedStream:
    """One model forward per batch of contexts for every cell; each cell's activations store reads its head's
    states from its own queue instead of running the model."""

    def __init__(self, cells: list[PreparedCell], batches_per_pass: int = 1):
        if not isinstance(batches_per_pass, int) or batches_per_pass < 1:
            raise ValueError(f"batches_per_pass must be a positive integer, got {batches_per_pass!r}")
        self.batches_per_pass = batches_per_pass
        if not cells:
            raise ValueError("a stream needs at least one cell")
        keys = {stream_key(cell) for cell in cells}
        if len(keys) != 1:
            raise ValueError("these cells cannot share one activation stream: they differ in text, context size, "
                             "batch or buffer sizes, or position slice")
        self.cells = cells
        self.source = cells[0].store  # tokens come from here; every store would give the same ones
        self.hook_names = sorted({cell.hook_name for cell in cells}, key=_layer_of)
        self.stop_at_layer = max(_layer_of(name) for name in self.hook_names) + 1
        self.n_forward_passes = 0
        for cell in cells:
            cell.store.get_filtered_llm_batch = self._reader(cell)

    def _reader(self, cell: PreparedCell):
        def read(raise_on_epoch_end: bool = False) -> torch.Tensor:
            while True:
                if not cell.queue:
                    self._produce(raise_on_epoch_end)
                item = cell.queue.popleft()
                if item is _EPOCH_END:
                    if raise_on_epoch_end:
                        raise StopIteration("the text is exhausted; a new epoch begins")
                    continue
                return item

        return read

    @torch.no_grad()
    def _produce(self, raise_at_epoch_end: bool) -> None:
        """The next ``batches_per_pass`` batches of contexts (SAELens' store batches) through the model in one pass;
        every cell's rows appended to its queue, batch by batch, as if each batch had had its own pass."""
        source = self.source
        batches, epoch_ended = [], False
        for _ in range(self.batches_per_pass):
            try:
                batches.append(source.get_batch_tokens(raise_at_epoch_end=raise_at_epoch_end))
            except StopIteration:
                epoch_ended = True
                break
        if batches:
            self._forward(batches)
        if epoch_ended:
            for cell in self.cells:
                cell.queue.append(_EPOCH_END)

    def _forward(self, batches: list[torch.Tensor]) -> None:
        source = self.source
        tokens = torch.cat(batches)  # [sum of batch, context]
        with torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=source.autocast_lm):
            _, cache = source.model.run_with_cache(tokens, names_filter=list(self.hook_names),
                                                   stop_at_layer=self.stop_at_layer, prepend_bos=False,
                                                   **source.model_kwargs)
        self.n_forward_passes += 1
        start = 0
        for batch in batches:
            rows = slice(start, start + batch.shape[0])
            start += batch.shape[0]
            token_ids = batch[:, slice(*source.seqpos_slice)].reshape(-1).to(source.device)  # [batch * pos']
            for cell in self.cells:
                cell.queue.append(head_rows(cache[cell.hook_name][rows], cell.head, cell.store, token_ids))
        del cache


def head_rows(states: torch.Tensor, head: int, store, token_ids: torch.Tensor) -> torch.Tensor:
    """One head's states as the training rows SAELens' store makes of them: ``states`` [batch, pos, head, d_in] ->
    the position slice, the head, float32 on the store's device, [batch * pos', d_in], special tokens dropped."""
    sliced = states[:, slice(*store.seqpos_slice)]  # [batch, pos', head, d_in]
    rows = torch.zeros((sliced.shape[0], sliced.shape[1], store.d_in), device=store.device)
    rows[:, :] = sliced[:, :, head]
    rows = rows.to(store.device).reshape(-1, store.d_in)
    if store.exclude_special_tokens is not None:
        rows = rows[~torch.isin(token_ids, store.exclude_special_tokens)]
    return rows


def _layer_of(hook_name: str) -> int:
    parts = hook_name.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"hook {hook_name!r} is not a block hook (blocks.LAYER....)")
    return int(parts[1])


def train_cells(cells: list[PreparedCell], progress: bool = True, batches_per_pass: int = 1) -> dict[str, object]:
    """Train every prepared cell from one shared stream, in lockstep; each SAE is saved where its single-cell run
    would save it (the runner's ``output_path``). Returns {cell name: trained SAE}. The global random state is
    left as it was.

    ``batches_per_pass``: batches of contexts (the single-cell path's model batches) run together in one model pass.
    1 gives exactly the single-cell path's passes; more is faster when a batch is small (final-token states: one
    context per batch) and gives the same states as far as the model's forward pass does not depend on the batch
    size (bitwise on CPU for the shipped models; within float tolerance on GPUs)."""
    from sae_lens.training.sae_trainer import SAETrainer

    SharedStream(cells, batches_per_pass)  # each cell's store now reads from the shared stream
    kept = RandomState.now(torch.device(cells[0].runner.cfg.device))
    try:
        for cell in cells:
            runner = cell.runner
            with cell.own_random_state():
                runner._set_sae_metadata()  # what the runner's run() does first
                cell.trainer = SAETrainer(sae=runner.sae, data_provider=runner.activations_store,
                                          evaluator=runner.evaluator, save_checkpoint_fn=runner.save_checkpoint,
                                          cfg=runner.cfg.to_sae_trainer_config())
                _begin(cell.trainer)
        total = max(cell.trainer.cfg.total_training_samples for cell in cells)
        with tqdm(total=total, desc=f"training {len(cells)} SAEs from one stream", disable=not progress) as bar:
            active = list(cells)
            while active:
                for cell in active:
                    with cell.own_random_state():
                        _step(cell.trainer)
                done = min(cell.trainer.n_training_samples for cell in active)
                bar.update(min(done, total) - bar.n)
                active = [c for c in active if c.trainer.n_training_samples < c.trainer.cfg.total_training_samples]
        saes = {}
        for cell in cells:
            with cell.own_random_state():
                saes[cell.name] = _finish(cell)
        return saes
    finally:
        kept.restore()


def _begin(trainer) -> None:
    """The part of ``SAETrainer.fit`` before its loop."""
    trainer.sae.to(trainer.cfg.device)
    normalize = trainer.sae.cfg.normalize_activations
    if normalize == "expected_average_only_in" and trainer.activation_scaler.scaling_factor is None:
        trainer.activation_scaler.estimate_scaling_factor(d_in=trainer.sae.cfg.d_in,
                                                          data_provider=trainer.data_provider,
                                                          n_batches_for_norm_estimate=trainer.cfg
                                                          .n_batches_for_norm_estimate)
    elif normalize == "covariance_whitening" and trainer.activation_scaler.whitening is None:
        trainer.activation_scaler.estimate_whitening(d_in=trainer.sae.cfg.d_in, data_provider=trainer.data_provider,
                                                     n_batches_for_norm_estimate=trainer.cfg
                                                     .n_batches_for_norm_estimate)
    elif normalize not in (None, "none", "expected_average_only_in", "covariance_whitening"):
        raise ValueError(f"normalize_activations={normalize!r} is not supported by the sweep's stream")


def _step(trainer) -> None:
    """One pass of ``SAETrainer.fit``'s loop (no wandb, no checkpoints: the pipeline turns both off)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All samples in the training dataset have been exhausted")
        trainer.maybe_reset_sparsity()
        trainer.step(next(trainer.data_provider))
    trainer.n_training_steps += 1


def _finish(cell: PreparedCell):
    """The part of ``SAETrainer.fit`` after its loop, then the runner's saving of the final SAE."""
    trainer, runner = cell.trainer, cell.runner
    sae = trainer.sae
    if trainer.activation_scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    whitening = trainer.activation_scaler.whitening
    if whitening is not None:
        sae.fold_activation_whitening(mean=whitening.mean, whitening_matrix=whitening.matrix,
                                      unwhitening_matrix=whitening.inverse_matrix)
        trainer.activation_scaler.whitening = None
    trainer.set_final_sae_metadata()
    if runner.cfg.output_path is not None:
        runner.save_final_sae(sae=sae, output_path=runner.cfg.output_path,
                              log_feature_sparsity=trainer.log_feature_sparsity)
    return sae
