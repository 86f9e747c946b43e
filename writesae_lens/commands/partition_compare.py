"""``writesae partition-compare``: partitions of several runs side by side (paper-method §5.1's comparisons).

Reads the output folders of ``writesae partition`` (``firings.csv``, ``atoms.csv``, ``summary.json``) and writes to
--out: ``ks_tests.csv`` (every pairwise KS test of the firing-level cosines, scipy's p, the feature-level cluster
bootstrap p and its Holm-adjusted value), ``class_counts.csv`` / ``class_stability.csv`` (counts per run, their CV),
with ``--seeds`` also ``seed_matches.csv`` (the share of atoms matched in the other seeds' dictionaries), the
ECDF plot ``cosine_ecdfs.png`` and ``summary.txt`` / ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import int_at_least, output_arguments, positive_float

NAME = "partition-compare"
HELP = "compare the partitions of several runs (KS tests with Holm correction, stability across seeds)"
DESCRIPTION = ("Pairwise two-sample KS tests of the firing-level atom-write cosines of several `writesae partition` "
               "runs (architectures, cells or seeds), with a feature-level cluster bootstrap (all firings of an atom "
               "resampled together) and Holm's correction over the contrasts. With --seeds (the runs are seeds of "
               "one cell): the coefficient of variation of the class counts and the share of atoms whose best "
               "match in another seed's dictionary has |Frobenius cosine| above --match-threshold.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=FOLDER",
                        help="two or more `writesae partition` output folders, each with a label")
    parser.add_argument("--write-form", choices=["beta", "delta"], default="beta",
                        help="which cosine the KS tests compare (default: %(default)s)")
    parser.add_argument("--contrasts", nargs="+", default=None, metavar="A:B",
                        help="the pairs to test (default: every pair)")
    parser.add_argument("--n-resamples", type=int_at_least(1), default=2000,
                        help="cluster-bootstrap resamples per contrast (default: %(default)s)")
    parser.add_argument("--alpha", type=positive_float, default=0.05, help="family-wise level (default: 0.05)")
    parser.add_argument("--seeds", action="store_true",
                        help="the runs are seeds of one cell: also match their atoms (SAEs from each run's settings, "
                        "or --saes)")
    parser.add_argument("--saes", nargs="+", default=None, metavar="LABEL=FOLDER",
                        help="the SAE folder of each run, where its summary.json does not point to it")
    parser.add_argument("--match-threshold", type=positive_float, default=0.9,
                        help="|cosine| above which two atoms match (default: %(default)s, the paper's)")
    parser.add_argument("--device", default="cpu", help="where the SAEs are loaded (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    output_arguments(parser)


def labelled_folders(items: list[str], option: str) -> dict[str, Path]:
    """``["a=path", ...]`` as ``{"a": Path("path")}``, with clear errors for a missing label or a repeated one."""
    folders: dict[str, Path] = {}
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"{option} takes LABEL=FOLDER items, got {item!r}")
        if label in folders:
            raise ValueError(f"{option}: the label {label!r} is given twice")
        folders[label] = Path(folder)
    return folders


def read_partition(folder: Path) -> dict:
    """The tables and settings of one `writesae partition` output folder."""
    import pandas as pd

    missing = [name for name in ("firings.csv", "atoms.csv", "summary.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a `writesae partition` output folder (missing {', '.join(missing)})")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    # the class "null" (a dead atom) must stay a string: pandas reads "null" as NaN by default
    atoms = pd.read_csv(folder / "atoms.csv", keep_default_na=False, na_values=[""])
    return {"firings": pd.read_csv(folder / "firings.csv"), "atoms": atoms,
            "settings": summary.get("settings", {}), "partition": summary.get("partition", {})}


def run(args) -> int:
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    folders = labelled_folders(args.runs, "--runs")
    if len(folders) < 2:
        raise ValueError(f"--runs needs at least two runs, got {len(folders)}")
    if args.alpha >= 1:
        raise ValueError(f"--alpha must be below 1, got {args.alpha}")
    if not 0 < args.match_threshold < 1:
        raise ValueError(f"--match-threshold must be in (0, 1), got {args.match_threshold}")
    contrasts = None
    if args.contrasts is not None:
        contrasts = [tuple(item.split(":")) for item in args.contrasts]
        for item, pair in zip(args.contrasts, contrasts):
            if len(pair) != 2 or any(label not in folders for label in pair):
                raise ValueError(f"--contrasts item {item!r} must be A:B with two labels of --runs {list(folders)}")
    runs = {label: read_partition(folder) for label, folder in folders.items()}
    saes = load_seed_saes(args, runs) if args.seeds else None
    with staged_output(args.out, args.overwrite, inputs=list(folders.values())) as out:
        text = compare_and_save(runs, saes, contrasts, args, out)
    print(text)
    print(f"\ntables, summary and plot in {args.out}/")
    return 0


def load_seed_saes(args, runs: dict) -> dict:
    from .common import load_sae

    given = labelled_folders(args.saes, "--saes") if args.saes else {}
    unknown = sorted(set(given) - set(runs))
    if unknown:
        raise ValueError(f"--saes names runs that are not in --runs: {unknown}")
    saes = {}
    for label, run in runs.items():
        folder = given.get(label) or run["settings"].get("sae")
        if not folder:
            raise ValueError(f"run {label!r}: its summary.json names no SAE folder; give it with --saes {label}=FOLDER")
        saes[label] = load_sae(Path(folder), args.device)
    return saes


def compare_and_save(runs: dict, saes: dict | None, contrasts, args, out: Path) -> str:
    """Run the comparisons, write the tables and the plot to ``out``; return the summary text."""
    from ..evaluation.dictionary_plots import plot_cosine_ecdfs
    from ..evaluation.partition_compare import class_count_stability, compare_firing_cosines, seed_matches

    column = f"cos_{args.write_form}"
    firings = {label: run["firings"] for label, run in runs.items()}
    tests = compare_firing_cosines(firings, column=column, contrasts=contrasts, n_resamples=args.n_resamples,
                                   alpha=args.alpha, seed=args.seed)
    counts, stability = class_count_stability({label: run["atoms"] for label, run in runs.items()})
    tests.to_csv(out / "ks_tests.csv", index=False)
    counts.to_csv(out / "class_counts.csv", index=False)
    stability.to_csv(out / "class_stability.csv", index=False)
    plot_cosine_ecdfs(firings, out / "cosine_ecdfs.png", column=column)
    payload = {"ks_tests": tests.to_dict("records"), "class_counts": counts.to_dict("records"),
               "class_stability": stability.to_dict("records")}
    lines = [f"Firing-level cosines ({column}), pairwise two-sample KS tests, feature-level cluster bootstrap "
             f"({args.n_resamples} resamples), Holm over {len(tests)} contrast(s) at alpha = {args.alpha:g}:",
             tests[["group_a", "group_b", "n_a", "n_b", "clusters_a", "clusters_b", "median_a", "median_b", "d",
                    "p_ks", "p_cluster", "p_holm", "reject"]].to_string(index=False),
             "", "Class counts per run:", counts.to_string(index=False),
             "", "Across runs (CV = std / mean):", stability.to_string(index=False)]
    if saes is not None:
        alive = {label: _alive_mask(run["atoms"]) for label, run in runs.items()}
        matches = seed_matches(saes, threshold=args.match_threshold, alive=alive)
        matches.to_csv(out / "seed_matches.csv", index=False)
        payload["seed_matches"] = matches.to_dict("records")
        lines += ["", f"Alive atoms matched in another seed's dictionary (|Frobenius cosine| > {args.match_threshold:g};"
                  " best match, and one-to-one assignment):", matches.to_string(index=False)]
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    settings = {k: str(v) for k, v in vars(args).items() if k != "command"}
    (out / "summary.json").write_text(json.dumps({"settings": settings, **payload}, indent=2, default=_json_value),
                                      encoding="utf-8")
    return text


def _alive_mask(atoms):
    import numpy as np

    mask = np.zeros(int(atoms["atom"].max()) + 1, dtype=bool)
    mask[atoms.loc[atoms["class"] != "null", "atom"].to_numpy()] = True
    return mask


def _json_value(value):
    return bool(value) if type(value).__name__ == "bool_" else float(value)
