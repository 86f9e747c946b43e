"""Static HTML pages (Jinja2) and a Neuronpedia-style JSON file from ``DashboardData``.

``write_dashboard(data, folder)`` writes ``index.html``, ``atoms/atom_NNNNN.html`` (one per atom) and
``features.json``. The pages are self-contained: inline CSS, inline SVG histograms, no script, no font, no image
file, and a Content-Security-Policy (``default-src 'none'``) that forbids any fetch, so a page viewed offline looks
the same as online and can never call out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

from .data import AtomDashboard, DashboardData

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def atom_page_name(atom: int) -> str:
    """The file name of an atom's page, relative to ``atoms/``."""
    return f"atom_{atom:05d}.html"


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("writesae_lens.dashboard", "templates"),
                              autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def visible(text: str) -> str:
    """A token's text with its whitespace made visible (a newline as the return sign, a tab as an arrow)."""
    return text.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "\u240d") or "\u2205"


def svg_bars(counts: list[int], edges: list[float], width: int = 360, height: int = 110) -> dict:
    """Rectangles of a histogram in an SVG ``width x height`` box (bars scaled to the largest count)."""
    if not counts:
        return {"width": width, "height": height, "bars": [], "low": 0.0, "high": 0.0, "top": 0}
    top = max(counts) or 1
    step = width / len(counts)
    bars = [{"x": round(i * step, 2), "w": round(max(step - 1, 0.5), 2), "h": round(height * c / top, 2),
             "y": round(height - height * c / top, 2), "count": int(c), "low": edges[i], "high": edges[i + 1]}
            for i, c in enumerate(counts)]
    return {"width": width, "height": height, "bars": bars, "low": edges[0], "high": edges[-1], "top": int(top)}


def highlight_alpha(code: float, top: float) -> float:
    """The opacity of a token's highlight: its code over the largest code on the page (0..1)."""
    return 0.0 if top <= 0 else round(min(1.0, max(0.0, code / top)), 3)


def records(table) -> list[dict]:
    """A table's rows as plain dicts (column lists zipped: much cheaper than ``DataFrame.to_dict`` per row)."""
    columns = list(table.columns)
    return [dict(zip(columns, row)) for row in zip(*(table[c].tolist() for c in columns))]


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}"


def page_context(data: DashboardData, page: AtomDashboard) -> dict:
    """What ``atom.html`` renders for one atom (token texts resolved, histograms laid out)."""
    text = data.token_text
    top_code = page.activation["max"]
    contexts = [{"rank": row["rank"], "passage": row["passage"], "position": row["position"], "code": row["code"],
                 "token_id": row["token"],
                 "tokens": [{"id": t, "text": visible(text[t]), "title": f"{c:.4g}",
                             "alpha": highlight_alpha(c, top_code), "focus": i == row["focus"]}
                            for i, (t, c) in enumerate(zip(row["context_tokens"], row["context_codes"]))]}
                for row in records(page.top_contexts)]

    def token_rows(table, side, value):
        return [{"id": r["token"], "text": visible(text[r["token"]]), "value": r[value], "count": r.get("count"),
                 "component": r.get("component", 0)}
                for r in records(table) if r["side"] == side]

    return {
        "data": data, "page": page, "csp": CSP, "fmt": _fmt, "contexts": contexts,
        "activation_svg": svg_bars(page.activation["counts"], page.activation["edges"]),
        "logit_svg": svg_bars(page.logit_histogram["counts"], page.logit_histogram["edges"]),
        "key_top": token_rows(page.key_tokens, "top", "score"),
        "key_bottom": token_rows(page.key_tokens, "bottom", "score"),
        "value_top": token_rows(page.value_tokens, "top", "score"),
        "value_bottom": token_rows(page.value_tokens, "bottom", "score"),
        "promoted": token_rows(page.logit_effects, "promoted", "effect"),
        "suppressed": token_rows(page.logit_effects, "suppressed", "effect"),
        "hook": f"blocks.{data.layer}.mixer.hook_state", "page_name": atom_page_name(page.atom),
    }


def index_context(data: DashboardData) -> dict:
    """What ``index.html`` renders: one row per atom with a page."""
    rows = []
    for page in data.atoms:
        promoted = [r["token"] for r in records(page.logit_effects)
                    if r["side"] == "promoted" and r["component"] == 0][:3]
        rows.append({"atom": page.atom, "href": f"atoms/{atom_page_name(page.atom)}",
                     "n_firings": page.activation["n_firings"], "density": page.activation["density"],
                     "max": page.activation["max"], "partition": page.partition, "substitution": page.substitution,
                     "promoted": [visible(data.token_text[t]) for t in promoted]})
    alive = int((data.firing_counts > 0).sum())
    return {"data": data, "rows": rows, "csp": CSP, "fmt": _fmt, "alive": alive,
            "hook": f"blocks.{data.layer}.mixer.hook_state"}


def neuronpedia_features(data: DashboardData) -> dict:
    """The dashboards as JSON with Neuronpedia's feature fields (as SAEDashboard's Neuronpedia runner writes them:
    ``feature_index``, ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``, ``frac_nonzero``,
    ``freq_hist_data_bar_heights`` / ``_values`` (counts and bin centres, parallel), ``logits_hist_data_bar_*``,
    ``maxActApprox``, ``activations`` with ``tokens`` / ``values``) and the write-specific panels under
    ``writesae``. Logits: component 0 of the out-path (all of it for rank-1 atoms)."""
    text = data.token_text
    features = []
    for page in data.atoms:
        effects = [r for r in records(page.logit_effects) if r["component"] == 0]
        pos = [r for r in effects if r["side"] == "promoted"]
        neg = [r for r in effects if r["side"] == "suppressed"]
        activations = [{"tokens": [text[t] for t in row["context_tokens"]], "token_ids": row["context_tokens"],
                        "values": row["context_codes"], "maxValue": row["code"],
                        "maxValueTokenIndex": row["focus"], "passage": row["passage"], "position": row["position"]}
                       for row in records(page.top_contexts)]
        features.append({
            "feature_index": page.atom,
            "pos_str": [text[r["token"]] for r in pos], "pos_values": [r["effect"] for r in pos],
            "neg_str": [text[r["token"]] for r in neg], "neg_values": [r["effect"] for r in neg],
            "frac_nonzero": page.activation["density"],
            "freq_hist_data_bar_heights": page.activation["counts"],
            "freq_hist_data_bar_values": page.activation["centers"],
            "logits_hist_data_bar_heights": page.logit_histogram["counts"],
            "logits_hist_data_bar_values": page.logit_histogram["centers"],
            "maxActApprox": page.activation["max"],
            "activations": activations,
            "writesae": {
                "n_firings": page.activation["n_firings"], "mean_code": page.activation["mean"],
                "median_code": page.activation["median"], "factor_norms": page.factor_norms,
                "key_tokens": _token_table(page.key_tokens, text),
                "value_tokens": _token_table(page.value_tokens, text),
                "logit_effects": _token_table(page.logit_effects, text),
                "partition": page.partition, "substitution": page.substitution,
            },
        })
    return {"model_id": data.model_name, "layer": data.layer, "head": data.head,
            "hook_name": f"blocks.{data.layer}.mixer.hook_state", "d_sae": data.d_sae, "rank": data.rank,
            "n_prompts_total": data.n_passages, "n_tokens_in_prompt": data.n_pos, "features": features}


def _token_table(table, text: dict[int, str]) -> list[dict]:
    return [{**row, "text": text[row["token"]]} for row in records(table)]


def write_dashboard(data: DashboardData, folder: Path, progress: bool = True) -> list[Path]:
    """Write the index, one page per atom and ``features.json`` into ``folder`` (which must exist; the command
    passes a ``staged_output`` folder). Returns the paths written."""
    folder = Path(folder)
    env = _environment()
    (folder / "atoms").mkdir(exist_ok=True)
    written = []
    atom_template = env.get_template("atom.html")
    for page in tqdm(data.atoms, desc="dashboard pages", unit="page", disable=not progress):
        path = folder / "atoms" / atom_page_name(page.atom)
        path.write_text(atom_template.render(**page_context(data, page)), encoding="utf-8")
        written.append(path)
    index = folder / "index.html"
    index.write_text(env.get_template("index.html").render(**index_context(data)), encoding="utf-8")
    features = folder / "features.json"
    features.write_text(json.dumps(neuronpedia_features(data), allow_nan=False, default=_json_default),
                        encoding="utf-8")
    return [index, *written, features]


def _json_default(x):
    import numpy as np

    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
