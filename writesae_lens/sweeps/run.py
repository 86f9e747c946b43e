"""The whole sweep, as ``writesae sweep CONFIG --out OUT`` runs it (on one process or under torchrun).

1. Check: the config, the output folder (another sweep's is refused), the model's cells, each variant's SAE config —
   all before any training.
2. Train the runs that have no trained SAE yet, this rank's share, from one activation stream (``stream``).
3. Evaluate the trained runs that are not finished, this rank's share: reconstruction metrics on held-out passages
   and the substitution test (``pipeline.run_substitution``).
4. Rank 0: the results table and heatmaps.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from .config import SweepConfig, SweepConfigError, check_cells, load_config, train_settings
from .distributed import Ranks, process_group, world_from_environment
from .layout import SweepFolder, write_atomically
from .results import collect, run_row, save_heatmaps, save_table


def run_sweep(config_path: str | Path, out: str | Path, *, progress: bool = True, ranks: Ranks | None = None):
    """Run (or resume) the sweep; returns the results table on rank 0 (None on the others)."""
    config = load_config(config_path)
    ranks = ranks or world_from_environment()
    folder = SweepFolder(out)
    folder.check(config)
    device = ranks.device(config.device)
    with process_group(ranks, device):
        return _run(config, folder, ranks, device, progress)


def _run(config: SweepConfig, folder: SweepFolder, ranks: Ranks, device: str, progress: bool):
    from .. import pipeline
    from ..models import load_hooked_model

    model = load_hooked_model(config.model, device=device, dtype=getattr(torch, config.dtype))
    cfg = model.cfg
    cells = check_cells(config, list(cfg.recurrent_layers), cfg.n_heads)
    factories = {variant.name: variant_sae_factory(variant, cfg, device) for variant in config.variants}
    runs = config.runs(list(cfg.recurrent_layers), cfg.n_heads)
    train_documents, eval_documents = pipeline.split_documents(pipeline.load_texts(config.text))
    passages = pipeline.token_passages(model, eval_documents, config.substitution["passages"],
                                       config.substitution["passage_len"]).to(device)
    if ranks.is_main:
        folder.start(config)
        for run in runs:  # killed between publishing a finished run and removing its trained copy
            if folder.is_finished(run.name) and folder.is_trained(run.name):
                folder.retire_trained(run.name)
    ranks.barrier()

    pending = [run for run in runs if not folder.is_finished(run.name) and not folder.is_trained(run.name)]
    _together(ranks, "training", lambda: train_runs(model, train_documents, config, ranks.share(pending), folder,
                                                    ranks.rank, device, factories, progress))
    trained = [run for run in runs if folder.is_trained(run.name) and not folder.is_finished(run.name)]
    _together(ranks, "evaluation", lambda: [evaluate_run(model, config, run, passages, folder, ranks.rank, device)
                                            for run in ranks.share(trained)])
    table = None
    if ranks.is_main:
        table = collect(folder.runs, [run.name for run in runs])
        save_table(table, folder.root)
        layers = sorted({layer for layer, _ in cells})
        heads = sorted({head for _, head in cells})
        save_heatmaps(table, [v.name for v in config.variants], layers, heads, folder.root / "heatmaps")
    ranks.barrier()
    return table


def _together(ranks: Ranks, stage: str, work) -> None:
    """Run ``work`` on every rank; if it fails on any, every rank stops (the failing one with its own error)."""
    error = None
    try:
        work()
    except Exception as caught:  # noqa: BLE001  (re-raised below, after the other ranks are told)
        error = caught
    if ranks.world > 1:
        ranks.agree(error is None, f"the sweep's {stage} failed on another rank")
    if error is not None:
        raise error
    ranks.barrier()


def variant_sae_factory(variant, model_cfg, device: str):
    """None for the single-cell path's own SAE (TopK without options); otherwise a function that builds the
    variant's training SAE for a runner. The config is built now, so bad options fail before any training."""
    import writesae_lens.saes as ws

    if variant.architecture == "topk" and not variant.options:
        return None
    classes = {"topk": (ws.WriteTopKTrainingSAEConfig, ws.WriteTopKTrainingSAE),
               "batchtopk": (ws.WriteBatchTopKTrainingSAEConfig, ws.WriteBatchTopKTrainingSAE),
               "jumprelu": (ws.WriteJumpReLUTrainingSAEConfig, ws.WriteJumpReLUTrainingSAE)}
    config_class, sae_class = classes[variant.architecture]
    fields = dict(d_in=model_cfg.d_k * model_cfg.d_v, d_sae=variant.d_sae, d_k=model_cfg.d_k, d_v=model_cfg.d_v,
                  rank=variant.rank, device=device)
    if variant.architecture != "jumprelu":
        fields["k"] = variant.k
    clash = sorted(set(variant.options) & set(fields))
    if clash:
        raise SweepConfigError(f"variant {variant.name!r}: options {clash} are set by the variant or the model; "
                               "remove them from options")
    try:
        sae_config = config_class(**fields, **variant.options)
    except (TypeError, ValueError) as error:
        raise SweepConfigError(f"variant {variant.name!r}: {error}") from None
    return lambda runner: sae_class(copy.deepcopy(sae_config))  # its own config: the runner writes metadata into it


def train_runs(model, documents, config: SweepConfig, runs: list, folder: SweepFolder, rank: int, device: str,
               factories: dict, progress: bool) -> None:
    """Train ``runs`` from one stream in a staging folder; each trained SAE then moves to trained/RUN."""
    from .. import pipeline
    from .stream import prepare_cell, train_cells

    if not runs:
        return
    staging = folder.staging(rank)
    try:
        prepared = [prepare_cell(run.name, pipeline.train_state_sae, model, documents, train_settings(config, run),
                                 staging / run.name, device, replace_sae=factories[run.variant.name])
                    for run in runs]
        train_cells(prepared, progress=progress, batches_per_pass=config.batches_per_pass)
        for run in runs:
            folder.publish(staging / run.name, folder.trained / run.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def evaluate_run(model, config: SweepConfig, run, passages, folder: SweepFolder, rank: int, device: str) -> None:
    """Metrics and the substitution test of one trained run, staged; then the run moves to runs/RUN."""
    from .. import pipeline
    from ..commands.common import load_sae
    from ..evaluation.sae_evals import evaluate_state_sae

    settings = config.substitution
    staging = folder.staging(rank)
    try:
        staged = staging / run.name
        shutil.copytree(folder.trained / run.name, staged / "sae")
        sae = load_sae(staged / "sae", device)
        metrics = evaluate_state_sae(model, sae, passages[: settings["metrics_passages"]])
        (staged / "substitution").mkdir()
        summary, note = None, ""
        try:
            _, summary, _ = pipeline.run_substitution(
                model, sae, run.layer, run.head, passages, staged / "substitution", seed=settings["seed"],
                max_firings_per_feature=settings["max_firings_per_feature"], max_firings=settings["max_firings"])
        except ValueError as error:
            if "no firings" not in str(error):
                raise
            note = f"substitution test: {error}"
        n_dead = getattr(sae.cfg.metadata, "num_dead_features", None)
        row = run_row(run, metrics, summary, n_dead, note)
        write_atomically(staged / "metrics.json", json.dumps(metrics, indent=2))
        write_atomically(staged / "row.json", json.dumps(row, indent=2, default=float))
        folder.publish(staged, folder.runs / run.name)
        folder.retire_trained(run.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
