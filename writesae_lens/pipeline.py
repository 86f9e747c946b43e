"""The main job as reusable steps: texts -> a WriteSAE trained by SAELens on one head -> the substitution test.

The command line (``writesae``) is a thin layer over these functions; notebooks can call them directly.
"""

from __future__ import annotations

import json
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
    target = torch.device(device)
    with torch.random.fork_rng(devices=[target.index or 0] if target.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        return _train_seeded(model, documents, settings, output, device)


def _train_seeded(model, documents: list[str], settings: TrainSettings, output: Path, device: str):
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    import writesae_lens.saes as ws

    from .evaluation.substitution import check_cell

    cfg = model.cfg
    sae_cfg = ws.WriteTopKTrainingSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=settings.d_sae, d_k=cfg.d_k, d_v=cfg.d_v,
                                            k=settings.k, device=device)
    check_cell(model, ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=1, d_k=cfg.d_k,
                                                           d_v=cfg.d_v, k=1)), settings.layer, settings.head)
    contexts_per_batch = max(1, settings.batch_tokens // settings.context_size)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=str(cfg.model_name), hook_name=f"blocks.{settings.layer}.mixer.hook_state",
        hook_head_index=settings.head, dataset_path="local-texts", is_dataset_tokenized=False, streaming=False,
        context_size=settings.context_size, prepend_bos=False, training_tokens=settings.training_tokens,
        train_batch_size_tokens=settings.batch_tokens, store_batch_size_prompts=contexts_per_batch,
        n_batches_in_buffer=16, lr=settings.lr, lr_end=settings.lr / 10, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=settings.warmup_steps, dead_feature_window=200, feature_sampling_window=400,
        seqpos_slice=(settings.context_size - 1, None) if settings.final_token_only else (None,),
        device=device, logger=LoggingConfig(log_to_wandb=False), output_path=str(output), seed=settings.seed,
        verbose=False,
    )
    dataset = datasets.Dataset.from_dict({"text": documents})
    return LanguageModelSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset).run()


def run_substitution(model, sae, layer: int, head: int, passages: torch.Tensor, output: Path, *, seed: int = 2026,
                     max_firings_per_feature: int | None = 300, max_firings: int | None = None,
                     amplitude: str = "natural", timing: str = "after_read", kl_at: str = "next",
                     batch_size: int = 192, passage_batch_size: int = 8) -> tuple:
    """The substitution test, its statistics and plots; writes records.csv, summary.txt/json and two PNGs."""
    from .evaluation.plots import plot_kl_scatter, plot_log_ratio_density
    from .evaluation.records import save_records
    from .evaluation.stats import format_summary, summarize
    from .evaluation.substitution import replacement_test

    records = replacement_test(model, sae, layer, head, passages, max_firings_per_feature=max_firings_per_feature,
                               max_firings=max_firings, seed=seed, amplitude=amplitude, timing=timing, kl_at=kl_at,
                               batch_size=batch_size, passage_batch_size=passage_batch_size)
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
