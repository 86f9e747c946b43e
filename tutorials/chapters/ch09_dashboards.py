"""Notebook 09: feature dashboards for WriteSAE atoms (top contexts, key / value tokens, logit effects, HTML pages)."""

from cells import code, md, setup_cell

NOTEBOOK = "09_feature_dashboards.ipynb"

CELLS = [
    md(r'''
# 9. Feature dashboards for WriteSAE atoms

SAELens users read their features through dashboards: per feature, the contexts where it fires most, how often it
fires, and which logits it moves. A WriteSAE atom $A_i = p_i q_i^\top$ has more to show, because its two factors
live on different axes of the state: $p_i$ on the key axis (which keys, so which tokens, it matches) and $q_i$ on
the value axis (what it writes, so which logits it moves through the head's read and output path).

`writesae_lens.dashboard` computes all of it from one scan of held-out text and writes static pages that work
offline; `writesae dashboard` does the same from the command line (docs/dashboards.md). Everything here runs on the
tiny model shipped with the package and a small SAE trained in seconds.
'''),
    code(setup_cell('''
import json
import os
import tempfile
from pathlib import Path

import torch

from writesae_lens import pipeline
from writesae_lens.dashboard import atom_dashboards, scan_for_dashboards, write_dashboard
from writesae_lens.evaluation.firings import head_states
from writesae_lens.evaluation.logit_shift import head_output_matrix, out_path_logits
from writesae_lens.models import load_hooked_model
''')),
    code('''
LAYER, HEAD = 1, 0
model = load_hooked_model("qwen35-tiny")
train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
settings = pipeline.TrainSettings(layer=LAYER, head=HEAD, d_sae=128, k=8, context_size=128,
                                  training_tokens=128 * 16 * 60, batch_tokens=128 * 16, lr=2e-3, warmup_steps=10)
sae = pipeline.train_state_sae(model, train_docs, settings, OUT / "09_writesae")
torch.set_grad_enabled(False)
tokens = pipeline.token_passages(model, eval_docs, 24, 96)
print("held-out passages:", tuple(tokens.shape), " SAE:", sae.cfg.d_sae, "atoms")
'''),
    md('''
## One scan, then the numbers per atom

`scan_for_dashboards` runs the passages up to the layer, rebuilds the head's states from its write factors and
encodes them; it keeps every non-zero code and each token's summed native key and value. `atom_dashboards` turns
that into one `AtomDashboard` per atom (pandas tables and small dicts), here for the first 16 atoms that fire.
'''),
    code('''
scan = scan_for_dashboards(model, sae, LAYER, HEAD, tokens, progress=False)
data = atom_dashboards(model, sae, scan, n_atoms=16, n_contexts=5, progress=False)
page = data.atoms[0]
text = lambda ids: "".join(data.token_text[t] for t in ids)
print(f"atom {page.atom}: density {page.activation['density']:.4f}, max code {page.activation['max']:.4g}")
for row in page.top_contexts.itertuples():
    print(f"  {row.code:.4g}  ...{text(row.context_tokens[:row.focus])}[[{text([row.token])}]]"
          f"{text(row.context_tokens[row.focus + 1:])}...".replace("\\n", " "))
'''),
    md('''
The top contexts are the largest codes of that atom over the scan; the same states encoded directly agree:
'''),
    code('''
states, _ = head_states(model, tokens, LAYER, HEAD)
codes = sae.encode(states)[..., page.atom].flatten()  # [passages * positions]
best = codes.topk(5)
same = [(int(i) // tokens.shape[1], int(i) % tokens.shape[1]) for i in best.indices]
print("top contexts == top codes:", same == list(zip(page.top_contexts.passage, page.top_contexts.position)))
'''),
    md(r'''
## What p matches, what q writes

The key list ranks tokens by the cosine of $p$ with the token's mean native key over the scan, the value list by the
cosine of $q$ with its mean native value. The logit effect is the closed form's direct out-path
$\langle W_O[h]\, q, W_U[:, \mathrm{tok}]\rangle$: the shift of each logit at a later read per unit
$\varepsilon\, G\, \langle p, q_t\rangle$. Since $p q^\top = (-p)(-q)^\top$, the lists are read together.
'''),
    code('''
def show(table, value):
    return ", ".join(f"{data.token_text[t]!r} {v:+.3f}" for t, v in zip(table["token"], table[value]))

top = lambda table: table[table["side"].isin(["top", "promoted"])].head(6)
print("keys aligned with p:  ", show(top(page.key_tokens), "score"))
print("values aligned with q:", show(top(page.value_tokens), "score"))
print("promoted:             ", show(top(page.logit_effects), "effect"))
direct = out_path_logits(head_output_matrix(model.blocks[LAYER].mixer, HEAD), model.W_U, sae.W_dec_value[page.atom])[0]
print("logit effect == closed form:", direct.topk(6).indices.tolist() == top(page.logit_effects)["token"].tolist())
'''),
    md('''
## The pages

`write_dashboard` writes `index.html`, one page per atom in `atoms/` and `features.json` (Neuronpedia's feature
fields plus the write-specific panels). The pages carry their CSS inline, draw the histograms as inline SVG, run no
script and forbid every fetch with a Content-Security-Policy: open them from the folder, offline.
'''),
    code('''
folder = OUT / "09_dashboard"
folder.mkdir(exist_ok=True)
written = write_dashboard(data, folder, progress=False)
print(len(written), "files; open", folder / "index.html")
features = json.loads((folder / "features.json").read_text())
first = features["features"][0]
print("Neuronpedia fields:", sorted(k for k in first if k != "writesae"))
print("pos_str:", first["pos_str"][:5])
'''),
    md('''
To go further: `writesae partition` and a substitution run of the same SAE add each atom's register / bundle class,
median write cosine and substitution win rate to its page (`writesae dashboard --partition DIR --records FILE`).
'''),
]
