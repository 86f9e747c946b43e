"""The sweep config file: which cells, seeds and SAE variants; the shared training and evaluation settings.

A TOML (``.toml``) or JSON (``.json``) file::

    model = "qwen35-tiny"          # a shipped model's name or a checkpoint folder
    text = "corpus.txt"            # optional: documents to train on (default: the shipped held-out text)
    device = "cpu"                 # "cuda": under torchrun each rank takes cuda:LOCAL_RANK
    dtype = "float32"
    batches_per_pass = 1           # model batches run together in one forward pass (see stream.train_cells)
    seeds = [42, 43, 44]

    [cells]                        # layers x heads ("all": every recurrent layer / every head) ...
    layers = [1, 9, 17]
    heads = "all"
    # list = [[1, 0], [9, 3]]      # ... or an explicit list of [layer, head] (instead of layers / heads)

    [train]                        # shared by every run: they are trained from one activation stream
    context_size = 128
    training_tokens = 409600
    batch_tokens = 2048
    lr = 3e-4
    warmup_steps = 50
    final_token_only = true

    [[variants]]                   # one or more; each run is one cell x one seed x one variant
    name = "topk-r1"
    architecture = "topk"          # topk | batchtopk | jumprelu
    rank = 1
    d_sae = 2048
    k = 32                         # topk / batchtopk (batchtopk: the mean over a batch)
    # options = { l0_coefficient = 1e-5 }   # more fields of the architecture's SAELens training config

    [substitution]                 # the substitution test each finished run gets (defaults shown)
    passages = 200
    passage_len = 512
    max_firings_per_feature = 300
    seed = 2026
    metrics_passages = 16          # held-out passages for MSE / explained variance / L0

Everything is checked here, before a model is loaded; the cells are checked against the model by ``check_cells``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
_TRAIN_FIELDS = ("context_size", "training_tokens", "batch_tokens", "lr", "warmup_steps", "final_token_only")
_TOP_LEVEL = ("model", "text", "device", "dtype", "batches_per_pass", "seeds", "cells", "train", "variants",
              "substitution")
_VARIANT_FIELDS = ("name", "architecture", "rank", "d_sae", "k", "options")
_SUBSTITUTION_DEFAULTS = dict(passages=200, passage_len=512, max_firings_per_feature=300, max_firings=None,
                              seed=2026, metrics_passages=16)


class SweepConfigError(ValueError):
    """A sweep config that cannot run; the message names the file and the entry."""


@dataclass(frozen=True)
class Variant:
    name: str
    architecture: str = "topk"
    rank: int = 1
    d_sae: int = 2048
    k: int | float = 32
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One SAE of the sweep: a cell, a seed, a variant."""

    layer: int
    head: int
    seed: int
    variant: Variant

    @property
    def name(self) -> str:
        return f"L{self.layer}-H{self.head}-{self.variant.name}-s{self.seed}"


@dataclass
class SweepConfig:
    model: str
    seeds: list[int]
    variants: list[Variant]
    train: dict
    substitution: dict
    layers: list[int] | str = "all"
    heads: list[int] | str = "all"
    cell_list: list[tuple[int, int]] | None = None
    text: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batches_per_pass: int = 1  # model batches run together in one pass (stream.train_cells)

    def cells(self, recurrent_layers: list[int], n_heads: int) -> list[tuple[int, int]]:
        """The (layer, head) cells, given the model's recurrent layers and head count ("all" resolved)."""
        if self.cell_list is not None:
            return list(self.cell_list)
        layers = list(recurrent_layers) if self.layers == "all" else list(self.layers)
        heads = list(range(n_heads)) if self.heads == "all" else list(self.heads)
        return [(layer, head) for layer in layers for head in heads]

    def runs(self, recurrent_layers: list[int], n_heads: int) -> list[Run]:
        return [Run(layer, head, seed, variant) for layer, head in self.cells(recurrent_layers, n_heads)
                for variant in self.variants for seed in self.seeds]

    def fingerprint(self) -> str:
        """What makes two sweeps the same sweep (everything but how it runs: device, batches per pass): a folder
        holds the runs of one."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("device", "batches_per_pass")}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"model": self.model, "text": self.text, "device": self.device, "dtype": self.dtype,
                "batches_per_pass": self.batches_per_pass,
                "seeds": self.seeds, "layers": self.layers, "heads": self.heads,
                "cell_list": [list(c) for c in self.cell_list] if self.cell_list is not None else None,
                "train": self.train, "substitution": self.substitution,
                "variants": [asdict(v) for v in self.variants]}


def load_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep config file (TOML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise SweepConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}") from None
    return parse_config(raw, where=str(path))


def parse_config(raw: dict, where: str = "the sweep config") -> SweepConfig:
    """Check a config given as a dict (the file's content) and build the ``SweepConfig``."""
    def fail(message: str):
        raise SweepConfigError(f"{where}: {message}")

    if not isinstance(raw, dict):
        fail("must be a table of settings")
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        fail(f"unknown setting(s) {unknown}; known: {list(_TOP_LEVEL)}")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        fail("'model' (a shipped model's name or a checkpoint folder) is required")
    seeds = raw.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        fail(f"'seeds' must be a non-empty list of distinct integers, got {seeds!r}")

    train = dict(raw.get("train", {}))
    unknown = sorted(set(train) - set(_TRAIN_FIELDS))
    if unknown:
        fail(f"[train] has unknown field(s) {unknown}; known: {list(_TRAIN_FIELDS)} (per-variant fields such as "
             "d_sae, k and rank go in [[variants]])")

    substitution = {**_SUBSTITUTION_DEFAULTS, **raw.get("substitution", {})}
    unknown = sorted(set(substitution) - set(_SUBSTITUTION_DEFAULTS))
    if unknown:
        fail(f"[substitution] has unknown field(s) {unknown}; known: {list(_SUBSTITUTION_DEFAULTS)}")
    for name in ("passages", "passage_len", "metrics_passages"):
        if not _is_int(substitution[name]) or substitution[name] < (2 if name == "passage_len" else 1):
            fail(f"[substitution] {name} must be a positive integer"
                 f"{' >= 2' if name == 'passage_len' else ''}, got {substitution[name]!r}")

    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, list) or not variants_raw:
        fail("at least one [[variants]] entry is required (name, architecture, rank, d_sae, k)")
    variants = [_variant(entry, i, fail) for i, entry in enumerate(variants_raw)]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        fail(f"variant names must be distinct, got {names}")

    cells = raw.get("cells", {})
    if not isinstance(cells, dict):
        fail("[cells] must be a table: layers and heads, or list")
    unknown = sorted(set(cells) - {"layers", "heads", "list"})
    if unknown:
        fail(f"[cells] has unknown field(s) {unknown}; known: layers, heads, list")
    cell_list = None
    if "list" in cells:
        if "layers" in cells or "heads" in cells:
            fail("[cells] takes either list or layers / heads, not both")
        entries = cells["list"]
        if (not isinstance(entries, list) or not entries
                or not all(isinstance(c, list) and len(c) == 2 and all(_is_int(x) for x in c) for c in entries)):
            fail(f"[cells] list must be a non-empty list of [layer, head] pairs, got {entries!r}")
        cell_list = [tuple(c) for c in entries]
        if len(set(cell_list)) != len(cell_list):
            fail("[cells] list names a cell twice")
    layers = cells.get("layers", "all")
    heads = cells.get("heads", "all")
    for name, value in (("layers", layers), ("heads", heads)):
        if value != "all" and (not isinstance(value, list) or not value or not all(_is_int(x) for x in value)
                               or len(set(value)) != len(value)):
            fail(f"[cells] {name} must be \"all\" or a non-empty list of distinct integers, got {value!r}")

    for name in ("text", "device", "dtype"):
        if name in raw and not isinstance(raw[name], str):
            fail(f"{name!r} must be a string, got {raw[name]!r}")
    batches_per_pass = raw.get("batches_per_pass", 1)
    if not _is_int(batches_per_pass) or batches_per_pass < 1:
        fail(f"batches_per_pass must be a positive integer, got {batches_per_pass!r}")
    config = SweepConfig(model=raw["model"], batches_per_pass=batches_per_pass, seeds=list(seeds), variants=variants,
                         train=train, substitution=substitution, layers=layers, heads=heads, cell_list=cell_list,
                         text=raw.get("text"), device=raw.get("device", "cpu"), dtype=raw.get("dtype", "float32"))
    if config.dtype not in ("float32", "bfloat16"):
        fail(f"dtype must be \"float32\" or \"bfloat16\", got {config.dtype!r}")
    for variant in variants:  # every run's settings, checked as the single-cell path checks them
        try:
            from ..pipeline import check_train_settings

            check_train_settings(train_settings(config, Run(0, 0, seeds[0], variant)))
        except (ValueError, TypeError) as error:
            fail(f"variant {variant.name!r}: {error}")
    return config


def _variant(entry, index: int, fail) -> Variant:
    if not isinstance(entry, dict):
        fail(f"[[variants]] entry {index} must be a table")
    unknown = sorted(set(entry) - set(_VARIANT_FIELDS))
    if unknown:
        fail(f"[[variants]] entry {index} has unknown field(s) {unknown}; known: {list(_VARIANT_FIELDS)} "
             "(more SAE fields go in options)")
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        fail(f"[[variants]] entry {index} needs a name of letters, digits and _ . + - (it names folders), got {name!r}")
    architecture = entry.get("architecture", "topk")
    if architecture not in ARCHITECTURES:
        fail(f"variant {name!r}: unknown architecture {architecture!r}; known: {list(ARCHITECTURES)}")
    k = entry.get("k", 32)
    if architecture == "topk" and not _is_int(k):
        fail(f"variant {name!r}: k must be an integer for topk, got {k!r}")
    if not isinstance(k, numbers.Real) or isinstance(k, bool) or k <= 0:
        fail(f"variant {name!r}: k must be a positive number, got {k!r}")
    options = entry.get("options", {})
    if not isinstance(options, dict):
        fail(f"variant {name!r}: options must be a table of SAE config fields")
    for field_name in ("rank", "d_sae"):
        value = entry.get(field_name, 1 if field_name == "rank" else 2048)
        if not _is_int(value) or value < 1:
            fail(f"variant {name!r}: {field_name} must be a positive integer, got {value!r}")
    variant = Variant(name=name, architecture=architecture, rank=entry.get("rank", 1), d_sae=entry.get("d_sae", 2048),
                      k=k, options=dict(options))
    if architecture != "jumprelu" and k > variant.d_sae:
        fail(f"variant {name!r}: k = {k} active atoms cannot exceed d_sae = {variant.d_sae}")
    return variant


def train_settings(config: SweepConfig, run: Run):
    """The single-cell ``pipeline.TrainSettings`` of one run (the variant's architecture is applied on top)."""
    from ..pipeline import TrainSettings

    variant = run.variant
    k = variant.k if variant.architecture == "topk" else min(variant.d_sae, max(1, int(variant.k)))
    return TrainSettings(layer=run.layer, head=run.head, d_sae=variant.d_sae, k=k, seed=run.seed, rank=variant.rank,
                         **config.train)


def check_cells(config: SweepConfig, recurrent_layers: list[int], n_heads: int) -> list[tuple[int, int]]:
    """The cells, checked against the model: every layer recurrent, every head in range."""
    cells = config.cells(recurrent_layers, n_heads)
    for layer, head in cells:
        if layer not in recurrent_layers:
            raise SweepConfigError(f"layer {layer} is not a recurrent layer of {config.model}; recurrent layers: "
                                   f"{list(recurrent_layers)}")
        if not 0 <= head < n_heads:
            raise SweepConfigError(f"head {head} is out of range: {config.model}'s recurrent layers have heads "
                                   f"0..{n_heads - 1}")
    return cells


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
