"""The main job as reusable steps: texts -> a WriteSAE trained by SAELens on one head -> the substitution test.

The command line (``writesae``) is a thin layer over these functions; notebooks can call them directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import signal
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class TrainSettings:
    layer: int
    head: int
    d_sae: int = 2048
    k: int = 32
    context_size: int = 128
    training_tokens: int = 409_600
    batch_tokens: int = 2048
    lr: float = 3e-4
    warmup_steps: int = 50
    final_token_only: bool = False
    seed: int = 42
    rank: int = 1  # atoms sum_r p_r q_r^T (the rank-2 decoder control: 2)


def load_texts(path: str | Path | None) -> list[str]:
    """Documents from a text file (separated by ``<|endoftext|>`` or, failing that, by blank lines); None: the
    held-out text shipped with the package."""
    from .data import EOT, load_heldout_documents

    if path is None:
        return load_heldout_documents()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    parts = text.split(EOT) if EOT in text else text.split("\n\n")
    documents = [p.strip() for p in parts if p.strip()]
    if not documents:
        raise ValueError(f"{path} holds no text")
    return documents


def split_documents(documents: list[str], eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic split: the last ``eval_fraction`` of the documents are held out for evaluation."""
    if len(documents) < 2:
        raise ValueError("need at least two documents to split into training and evaluation text")
    cut = max(1, min(len(documents) - 1, round(len(documents) * (1 - eval_fraction))))
    return documents[:cut], documents[cut:]


def token_passages(model, documents: list[str], n_passages: int, n_pos: int) -> torch.Tensor:
    """``[n, n_pos]`` token blocks cut from the concatenated documents (at most ``n_passages``)."""
    for name, value in (("n_passages", n_passages), ("n_pos", n_pos)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; it is needed to tokenize the text")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document, add_special_tokens=False) + separator)
        if len(ids) >= n_passages * n_pos:
            break
    n = min(n_passages, len(ids) // n_pos)
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one passage of {n_pos}")
    return torch.tensor(ids[: n * n_pos]).reshape(n, n_pos)


def train_state_sae(model, documents: list[str], settings: TrainSettings, output: Path, device: str = "cpu"):
    """Train a rank-1 bilinear WriteSAE (TopK) with SAELens' own runner on ``blocks.{layer}.mixer.hook_state``,
    head ``settings.head``; the SAE is saved in ``output`` by the runner. Returns the trained SAE.

    SAELens draws the SAE's initial weights and mixes its activation buffer with torch's global generator and does
    not seed it: it is seeded here with ``settings.seed`` (and restored afterwards), so that one seed gives one SAE."""
    return _train_with_seed(model, documents, settings, output, device, flat=False)


def train_flat_sae(model, documents: list[str], settings: TrainSettings, output: Path, device: str = "cpu"):
    """SAELens' own flat TopK SAE (its registered ``"topk"`` architecture, dense encoder and decoder on the flattened
    ``d_k * d_v`` state) trained by its runner on the same hook and head as ``train_state_sae``, with the same
    settings (``rank`` does not apply): the flat baseline of paper §8.1. Returns the trained SAE."""
    return _train_with_seed(model, documents, settings, output, device, flat=True)


def _train_with_seed(model, documents: list[str], settings: TrainSettings, output: Path, device: str, flat: bool):
    check_train_settings(settings)
    target = torch.device(device)
    with torch.random.fork_rng(devices=[target.index or 0] if target.type == "cuda" else []), \
            _signal_handlers_kept():
        torch.manual_seed(settings.seed)
        try:
            return _train_seeded(model, documents, settings, output, device, flat)
        except Exception as error:
            from sae_lens.training._interruption import InterruptedException

            if isinstance(error, InterruptedException):  # SAELens' own SIGINT / SIGTERM handler: a Ctrl-C
                raise KeyboardInterrupt("SAE training interrupted") from None
            raise


# SAELens' runner stores the activations of this many batches of contexts before mixing them into training batches
BUFFER_BATCHES = 16


def check_train_settings(settings: TrainSettings) -> None:
    """Clear errors, naming the value and what is valid, for settings that would crash deep inside SAELens or train
    nothing (no step at all, a batch larger than SAELens' activation buffer)."""
    for name in ("layer", "head", "d_sae", "k", "context_size", "training_tokens", "batch_tokens", "warmup_steps",
                 "seed", "rank"):
        value = getattr(settings, name)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    for name in ("d_sae", "k", "context_size", "training_tokens", "batch_tokens", "rank"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(settings, name)}")
    if settings.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 or more, got {settings.warmup_steps}")
    if not isinstance(settings.lr, numbers.Real) or not math.isfinite(settings.lr) or settings.lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {settings.lr!r}")
    if settings.k > settings.d_sae:
        raise ValueError(f"k = {settings.k} active atoms cannot exceed the dictionary size d_sae = {settings.d_sae}")
    if settings.training_tokens < settings.batch_tokens:
        raise ValueError(f"training_tokens = {settings.training_tokens} is less than one batch (batch_tokens = "
                         f"{settings.batch_tokens}): no training step would run; give at least {settings.batch_tokens}")
    per_context = 1 if settings.final_token_only else settings.context_size
    buffer = BUFFER_BATCHES * per_context
    if settings.batch_tokens > buffer:
        raise ValueError(f"batch_tokens = {settings.batch_tokens} is larger than SAELens' activation buffer of "
                         f"{buffer} states ({BUFFER_BATCHES} x {per_context} per context"
                         f"{' with final_token_only' if settings.final_token_only else ''}); use batch_tokens <= "
                         f"{buffer}" + ("" if settings.final_token_only else " or a longer context_size"))


@contextlib.contextmanager
def _signal_handlers_kept():
    """SAELens' runner installs its own SIGINT / SIGTERM handlers and leaves them: put the caller's back."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in kept.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _train_seeded(model, documents: list[str], settings: TrainSettings, output: Path, device: str, flat: bool):
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    import writesae_lens.saes as ws

    from .evaluation.substitution import check_cell
    from .hooking.loading import canonical_model_name

    cfg = model.cfg
    if flat:
        from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

        sae_cfg = TopKTrainingSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=settings.d_sae, k=settings.k, device=device)
    else:
        sae_cfg = ws.WriteTopKTrainingSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=settings.d_sae, d_k=cfg.d_k,
                                                d_v=cfg.d_v, k=settings.k, rank=settings.rank, device=device)
    check_cell(model, ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=1, d_k=cfg.d_k,
                                                           d_v=cfg.d_v, k=1)), settings.layer, settings.head)
    contexts_per_batch = max(1, settings.batch_tokens // settings.context_size)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=canonical_model_name(cfg.model_name),
        hook_name=f"blocks.{settings.layer}.mixer.hook_state",
        hook_head_index=settings.head, dataset_path="local-texts", is_dataset_tokenized=False, streaming=False,
        context_size=settings.context_size, prepend_bos=False, training_tokens=settings.training_tokens,
        train_batch_size_tokens=settings.batch_tokens, store_batch_size_prompts=contexts_per_batch,
        n_batches_in_buffer=16, lr=settings.lr, lr_end=settings.lr / 10, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=settings.warmup_steps, dead_feature_window=200, feature_sampling_window=400,
        seqpos_slice=(settings.context_size - 1, None) if settings.final_token_only else (None,),
        device=device, logger=LoggingConfig(log_to_wandb=False), output_path=str(output), seed=settings.seed,
        model_class_name=type(model).__name__, model_from_pretrained_kwargs={},  # the SAE's metadata names our model
        verbose=False, checkpoint_path=None,  # no ./checkpoints folder, also when interrupted
    )
    dataset = datasets.Dataset.from_dict({"text": documents})
    with _sae_lens_notices_that_do_not_apply(), _progress_bar_to_the_end():
        return LanguageModelSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset).run()


# SAELens warnings that mislead here: it compares the number of *documents* with the number of training *tokens*
# (so any text looks too short), and advises pre-tokenizing a dataset this pipeline builds from the user's text.
_MISLEADING_SAE_LENS_WARNINGS = (
    r"The training dataset contains fewer samples .* than the number of samples required",
    r"Dataset is not tokenized\. Pre-tokenizing will improve performance",
)


@contextlib.contextmanager
def _sae_lens_notices_that_do_not_apply():
    with warnings.catch_warnings():
        for message in _MISLEADING_SAE_LENS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


@contextlib.contextmanager
def _progress_bar_to_the_end():
    """SAELens' trainer moves its bar every 100 steps only, so a run whose step count is not a multiple of 100
    ends short of 100 %; complete the bar on the last step (the bar's per-100-step updates are unchanged)."""
    from sae_lens.training.sae_trainer import SAETrainer

    original = SAETrainer.__dict__["_update_pbar"]

    def update(trainer, step_output, pbar, *args, **kwargs):
        original(trainer, step_output, pbar, *args, **kwargs)
        if trainer.n_training_samples >= trainer.cfg.total_training_samples and pbar.n != pbar.total:
            pbar.n = pbar.total
            pbar.refresh()

    SAETrainer._update_pbar = update
    try:
        yield
    finally:
        SAETrainer._update_pbar = original


def run_substitution(model, sae, layer: int, head: int, passages: torch.Tensor, output: Path, *, seed: int = 2026,
                     max_firings_per_feature: int | None = 300, max_firings: int | None = None,
                     amplitude: str = "natural", timing: str = "after_read", kl_at: str = "next",
                     batch_size: int = 192, passage_batch_size: int = 8, ignore_sae_metadata: bool = False) -> tuple:
    """The substitution test, its statistics and plots; writes records.csv, summary.txt/json and two PNGs.
    ``ignore_sae_metadata``: accept an SAE recorded for another model, hook or head (``check_cell``)."""
    from .evaluation.plots import plot_kl_scatter, plot_log_ratio_density
    from .evaluation.records import save_records
    from .evaluation.stats import format_summary, summarize
    from .evaluation.substitution import replacement_test

    records = replacement_test(model, sae, layer, head, passages, max_firings_per_feature=max_firings_per_feature,
                               max_firings=max_firings, seed=seed, amplitude=amplitude, timing=timing, kl_at=kl_at,
                               batch_size=batch_size, passage_batch_size=passage_batch_size,
                               ignore_sae_metadata=ignore_sae_metadata)
    summary = summarize(records, seed=seed)
    text = format_summary(summary)
    save_records(records, output / "records.csv", overwrite=True)
    (output / "summary.txt").write_text(text + "\n", encoding="utf-8")
    (output / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2, default=str), encoding="utf-8")
    plot_kl_scatter(records, output / "kl_scatter.png")
    plot_log_ratio_density(records, output / "kl_log_ratio_density.png")
    return records, summary, text


def save_settings(output: Path, **settings) -> None:
    clean = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in settings.items()}
    (output / "settings.json").write_text(json.dumps(clean, indent=2, default=str), encoding="utf-8")


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return value.tolist()
    if hasattr(value, "to_dict"):  # pandas frames
        return value.to_dict(orient="records")
    return value
