"""Notebook 05: what the dictionary is (register / bundle partition, baselines, reconstruction in the cache)."""

from cells import PICK_HEAD, code, md, setup_cell

NOTEBOOK = "05_what_the_dictionary_is.ipynb"

CELLS = [
    md(r'''
# 5. What the dictionary is: registers, bundles and baselines

Notebook 03 asked whether an atom can stand in for the native write. This one asks what kind of object the atoms
are, and whether their write shape matters:

1. **Partition.** For every firing, the signed cosine between the atom $A_i = p_i q_i^\top$ and the native write
   $k_t u_t^\top$ at that position. In the Frobenius inner product it factorises,
   $\cos_F(p q^\top, k u^\top) = \cos(p, k)\,\cos(q, u)$, so no matrix is built. Per atom we take the median over its
   firings; atoms whose median is at least $\tau = 0.05$ are **registers** (they look like writes), the others
   **bundles**, and dead atoms **null**. Gaussian mixtures and their BIC describe how bimodal the medians are.
2. **Baselines.** SAELens' own flat TopK SAE (trained by its runner on the same hook) enters the substitution test
   through the top-1 SVD of its reconstruction, at the native write's norm; a rank-2 WriteSAE is the decoder control.
3. **Reconstruction in the cache.** Replace the head's state by each reconstruction (or by its rank-$r$ truncation)
   at a prefix boundary and measure the suffix perplexity.
4. **Passage bits/token.** Delete, or randomly replace, the write at every register firing of a passage, all at once.

Everything runs on the tiny model shipped with the package, with small SAEs trained for a few seconds: the numbers
show the mechanics, not the paper's results.
'''),
    code(setup_cell('''
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Image, display

from writesae_lens import pipeline
from writesae_lens.evaluation.baselines import compare_substitution, flat_svd_test
from writesae_lens.evaluation.cache_reconstruction import (identity_splice, reconstruction_sweep,
                                                           reconstruction_table, standard_conditions)
from writesae_lens.evaluation.dictionary_plots import plot_cosine_histogram, plot_reconstruction
from writesae_lens.evaluation.partition import format_partition, partition_atoms, write_cosines
from writesae_lens.evaluation.partition_records import class_win_rates, cosine_bin_table, failure_by_quartile
from writesae_lens.evaluation.passage_bits import passage_bits_per_token, summarize_bits
from writesae_lens.evaluation.substitution import replacement_test
from writesae_lens.interventions import atom_matrices
from writesae_lens.models import load_hooked_model
''')),
    md('''
## Three small dictionaries on one head

The head with the longest memory (the rule of notebook 01), and three SAEs trained with SAELens' runner on its state
with the same settings: the WriteSAE (rank-1 atoms), the rank-2 control (`TrainSettings(rank=2)`) and SAELens' flat
TopK SAE (`pipeline.train_flat_sae`: its registered `"topk"` architecture, a dense decoder row per atom).
'''),
    code('''
model = load_hooked_model("qwen35-tiny")
train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
passages = pipeline.token_passages(model, eval_docs, 16, 128)
''' + PICK_HEAD + '''
memory = head_memory(model, passages)
LAYER = int(memory.max(axis=1).idxmax())
HEAD = int(memory.loc[LAYER].to_numpy().argmax())
print(f"layer {LAYER}, head {HEAD}: median a_t = {memory.loc[LAYER].iloc[HEAD]:.2f}")

settings = pipeline.TrainSettings(layer=LAYER, head=HEAD, d_sae=128, k=8, context_size=64, training_tokens=64 * 8 * 80,
                                  batch_tokens=512, lr=3e-3, warmup_steps=5, seed=0)
writesae = pipeline.train_state_sae(model, train_docs, settings, OUT / "05_writesae")
flat = pipeline.train_flat_sae(model, train_docs, settings, OUT / "05_flat")
rank2 = pipeline.train_state_sae(model, train_docs, pipeline.TrainSettings(**{**settings.__dict__, "rank": 2}),
                                 OUT / "05_rank2")
torch.set_grad_enabled(False)  # training is done
for name, sae in (("writesae", writesae), ("flat", flat), ("rank2", rank2)):
    print(f"{name:9s} {type(sae).__name__:22s} decoder {tuple(sae.W_dec.shape)}")
'''),
    md('''
## The partition

`partition_atoms` encodes the head's state at every position of the passages and computes, for every firing, the
cosine of the atom with two forms of the write: `beta` ($u_t = \\beta_t v_t$, the additive write the paper calls
native) and `delta` ($u_t = \\delta_t$, the exact change of the state apart from its decay). First a check of the
factorisation on one firing: the product of the two factor cosines against the cosine of the materialised matrices.
'''),
    code('''
part = partition_atoms(model, writesae, LAYER, HEAD, passages, n_init=10, seed=0, progress=False)
first = part.firings.iloc[0]
from writesae_lens.evaluation.firings import head_states
_, factors = head_states(model, passages, LAYER, HEAD)
p, t, i = int(first.passage), int(first.position), int(first.atom)
write = factors["beta"][p, t] * torch.outer(factors["k"][p, t], factors["v"][p, t])
atom = atom_matrices(writesae, [i], 1)[0]
materialised = torch.nn.functional.cosine_similarity(atom.flatten(), write.flatten(), dim=0).item()
print(f"atom {i} at passage {p} position {t}: factorised {first.cos_beta:.6f}, materialised {materialised:.6f}")
print()
print(format_partition(part.summary, part.thresholds))
part.atoms.sort_values("n_firings", ascending=False).head(8)
'''),
    md('''
`median_cos_beta` and `median_cos_delta` are the per-atom medians of the two write forms; `class` uses the `beta`
form at $\\tau$. The histogram shows the medians with the two-component mixture fitted by scikit-learn and the
threshold. A clear gap between two modes (a large negative $\\Delta$BIC, a bimodality coefficient above 5/9) is what
the paper reports on Qwen3.5-0.8B; whatever this small SAE shows is what it is.
'''),
    code('''
histogram = plot_cosine_histogram(part.atoms, part.mixtures, OUT / "05_cosine_histogram.png")
display(Image(filename=str(histogram), width=520))
part.mixtures
'''),
    md('''
## Across seeds and dictionaries

Is the partition a property of the head or of one training run? A second WriteSAE with another seed, and the rank-2
control, go through the same partition. Their **firing-level** cosine distributions are compared pairwise with the
two-sample Kolmogorov-Smirnov statistic. The firings of one atom are not independent, so the p-value that matters is
the **feature-level cluster bootstrap** (all firings of an atom resampled together, under the pooled null), and with
several contrasts the p-values get **Holm's** correction (statsmodels). scipy's p-value, which takes every firing as
independent, is shown beside it: on clustered data it is far too small.

Across seeds, the paper reports class counts that vary by a few percent and atoms that rarely match one-to-one
(decoder cosine above 0.9). `seed_matches` computes each atom's best Frobenius cosine in the other dictionary from
the factors, and the one-to-one assignment (scipy's `linear_sum_assignment`).
'''),
    code('''
from writesae_lens.evaluation.dictionary_plots import plot_cosine_ecdfs
from writesae_lens.evaluation.partition_compare import class_count_stability, compare_firing_cosines, seed_matches

torch.set_grad_enabled(True)
seed1 = pipeline.train_state_sae(model, train_docs, pipeline.TrainSettings(**{**settings.__dict__, "seed": 1}),
                                 OUT / "05_writesae_seed1")
torch.set_grad_enabled(False)
parts = {"seed 0": part,
         "seed 1": partition_atoms(model, seed1, LAYER, HEAD, passages, n_init=10, seed=0, progress=False),
         "rank 2": partition_atoms(model, rank2, LAYER, HEAD, passages, n_init=10, seed=0, progress=False)}
firings = {label: p.firings for label, p in parts.items()}
ks = compare_firing_cosines(firings, n_resamples=500, seed=0, progress=False)
print(f"KS contrasts: {len(ks)}, Holm-adjusted")
display(ks[["group_a", "group_b", "d", "p_ks", "p_cluster", "p_holm", "reject"]].round(4))
counts, stability = class_count_stability({label: p.atoms for label, p in parts.items() if label != "rank 2"})
display(counts, stability.round(3))
seeds = seed_matches({"seed 0": writesae, "seed 1": seed1}, progress=False)
print(f"seed 0 atoms matched in seed 1 (|cos| > 0.9): {seeds.matched[0]:.1%} best match, "
      f"{seeds.matched_one_to_one[0]:.1%} one-to-one")
ecdf = plot_cosine_ecdfs(firings, OUT / "05_cosine_ecdfs.png")
display(Image(filename=str(ecdf), width=520))
'''),
    md('''
## The baselines in the substitution test

The flat SAE has no write-shaped atoms, so the substitution test puts in the **top-1 SVD of its reconstruction**
$\\hat S_t$ at the firing, rescaled to $\\lVert\\Delta\\rVert_F$ (`flat_svd_test(..., variant="reconstruction")`), or
the top-1 SVD of its dominant atom (`variant="atom"`). The rank-2 WriteSAE goes through `replacement_test` unchanged.
One table compares the four on the same passages; `reference_minus_pp` is the WriteSAE's win rate minus each one's.
'''),
    code('''
options = dict(max_firings_per_feature=3, max_firings=150, progress=False)
records = {
    "writesae": replacement_test(model, writesae, LAYER, HEAD, passages, **options),
    "flat_svd_reconstruction": flat_svd_test(model, flat, LAYER, HEAD, passages, variant="reconstruction", **options),
    "flat_svd_atom": flat_svd_test(model, flat, LAYER, HEAD, passages, variant="atom", **options),
    "rank2": replacement_test(model, rank2, LAYER, HEAD, passages, **options),
}
comparison = compare_substitution(records, reference="writesae")
print(f"{len(comparison)} substitutes compared")
comparison.round(4)
'''),
    md('''
The WriteSAE's records joined with the partition: the win rate per class (with a Mann-Whitney test between the
per-atom win rates of registers and bundles), the win rate per bin of the atom's median cosine (paper Table 13), and
the failure rate by quartile of $\\mathrm{KL}_\\text{delete}$ (small effects fail more often, paper Fig. 14).
'''),
    code('''
classes, test = class_win_rates(records["writesae"], part.atoms, min_firings=2)
print(f"Mann-Whitney (register vs bundle per-atom win rates): U = {test['u']}, p = {test['p']:.3g}")
display(classes.round(3), cosine_bin_table(records["writesae"], part.atoms, min_firings=2).round(3))
failure_by_quartile(records["writesae"]).round(4)
'''),
    md('''
## Reconstruction in the cache

Each passage runs to the middle with a cache; the head's state there is replaced by a reconstruction (the WriteSAE's,
the flat SAE's, the rank-2 SAE's) or by its rank-$r$ truncation, and the suffix is run from that cache. The prefix runs
once for all conditions and each condition's suffix only from the edited layer on (`reconstruction_sweep`). An
identity splice (the state written back unchanged) must leave the loss exactly as it was.
'''),
    code('''
sequences = pipeline.token_passages(model, eval_docs, 8, 256)
conditions = standard_conditions(model, [HEAD], {"writesae": {HEAD: writesae}, "flat": {HEAD: flat},
                                                 "rank2": {HEAD: rank2}})
conditions["identity"] = identity_splice([HEAD])
per_passage = reconstruction_sweep(model, LAYER, sequences, conditions, progress=False)
by = per_passage.pivot(index="passage", columns="condition", values="nll")
print(f"identity check: max |loss difference| = {(by['identity'] - by['native']).abs().max():.2e}")
table = reconstruction_table(per_passage)
figure = plot_reconstruction(table[table.condition != "identity"], OUT / "05_reconstruction.png")
display(Image(filename=str(figure), width=520))
table.round(6)
'''),
    md('''
## Passage bits/token

At every position of a passage where a register atom fires, delete the native write, or replace it by a random
rank-1 matrix of the same norm; the edits compound along the passage. The result is the change of the passage's mean
next-token loss in bits per token (the paper's Fig. 2b: deletion costs little, a random write of the same size much
more).
'''),
    code('''
registers = part.atoms.loc[part.atoms["class"] == "register", "atom"].tolist()
bits = passage_bits_per_token(model, writesae, LAYER, HEAD, passages[:8], registers, seed=0, progress=False)
summary = summarize_bits(bits)
print(f"delete {summary['delta_delete']:+.5f} bits/token, random {summary['delta_random']:+.5f} bits/token "
      f"over {summary['passages']} passages ({summary['edits']} edits)")
bits.round(5)
'''),
    md('''
The same analyses run from the command line on any model and cell: `writesae partition` (with `--records` from a
`writesae substitution` run to join), `writesae partition-compare` (several partition runs: KS tests with Holm, and
with `--seeds` the stability across seeds) and `writesae baselines` (which trains the flat and rank-2 SAEs unless
given).
`docs/dictionary.md` lists the decisions and the results measured on the shipped models.
'''),
]
