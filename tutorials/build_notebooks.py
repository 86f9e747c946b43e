"""Build the tutorial notebooks from the cells written below.

The notebooks are generated so that they can be reviewed (and diffed) as Python. Edit this file, then run

    python tutorials/build_notebooks.py            # rewrites tutorials/*.ipynb
    python tutorials/build_notebooks.py OUT_DIR    # writes them to OUT_DIR instead

The notebooks are written without outputs and with fixed cell ids, so rebuilding an unchanged file gives the same
bytes. `tests/test_tutorials.py` executes each notebook and checks that the committed files match this script.
Notebooks 01-03 are written below; later ones each live in a module of `tutorials/chapters/` (found automatically)
and use the helpers of `tutorials/cells.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent

sys.path.insert(0, str(HERE))  # the shared cell helpers and the chapters beside this file
from cells import KERNELSPEC, PICK_HEAD, code, md, setup_cell  # noqa: E402
from chapters import chapter_notebooks  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# 01: the write and its hooks
# ---------------------------------------------------------------------------------------------------------------------

NB01 = [
    md(r'''
# 1. The write and its hooks

A Gated DeltaNet layer (the recurrent layer of the Qwen3.5 hybrids) has no attention matrix. Each of its heads keeps
a small matrix, the **state** $S_t$ of shape $d_k \times d_v$, and updates it at every token:

$$S_t = a_t\,(I - \beta_t k_t k_t^\top)\,S_{t-1} + \beta_t\,k_t v_t^\top, \qquad \text{read}_t = S_t^\top q_t .$$

The last term is the **write**: a rank-1 matrix built from a key $k_t$, a value $v_t$ and a strength $\beta_t$.
Before writing, the layer shrinks the old state by the decay $a_t \in (0, 1)$ and erases part of what was stored under
the key $k_t$. Then it reads the state with a query $q_t$.

In this notebook you will:

1. load the tiny Qwen3.5-style model shipped with `writesae_lens` and tokenize some held-out text;
2. find the heads with the longest memory;
3. list the hook points of a recurrent layer;
4. rebuild the state from the cached write factors and check the formula above numerically;
5. edit one write, at the write itself and after the read, and watch the change travel to later positions and to
   the logits;
6. generate text with an edit switched on.

Everything runs on a CPU in a few seconds.
'''),
    code(setup_cell('''
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display

from writesae_lens import interventions
from writesae_lens.adapters import HookedQwen35
from writesae_lens.data import load_heldout_documents, pretrained_path
''', no_grad=True)),
    md('''
## Load the model and some held-out text

`pretrained_path("qwen35-tiny")` is the folder of a small model trained for this library: three Gated DeltaNet
layers and one gated-attention layer. `HookedQwen35.from_pretrained` reads it (with its tokenizer) into a
TransformerLens-style model with hook points everywhere. The held-out text is a set of documents that the model never
saw while training.
'''),
    code('''
model = HookedQwen35.from_pretrained(pretrained_path("qwen35-tiny"))
cfg = model.cfg
print(f"{cfg.n_layers} layers: Gated DeltaNet at {cfg.recurrent_layers}, attention at {cfg.attention_layers}")
print(f"{cfg.n_heads} heads per recurrent layer; each head's state is d_k x d_v = {cfg.d_k} x {cfg.d_v}")
'''),
    code('''
documents = load_heldout_documents()
text = documents[40][:2000]                # a chapter of Jane Austen's "Persuasion"
tokens = model.to_tokens(text)[:, :64]      # [batch, pos]; a BOS token (<|endoftext|>) is put in front
print("tokens:", tuple(tokens.shape))
print(model.to_string(tokens[0]))
print(model.to_str_tokens(tokens[0])[:12])
'''),
    md('''
## Which heads remember?

$a_t = \\exp(\\text{decay}_t)$ is the fraction of the state that survives one step (the `hook_decay` hook holds its
logarithm). A head with $a_t \\approx 0$ forgets everything at every token: its state is little more than the current
write. A head with $a_t$ near 1 keeps a long memory. The table shows the median $a_t$ of every head on our passage.
We follow the head with the longest memory: it makes the propagation of an edit easy to see.
'''),
    code(PICK_HEAD + '''

memory = head_memory(model, tokens)
display(memory.map(lambda a: f"{a:.2g}"))

LAYER = int(memory.max(axis=1).idxmax())
HEAD = int(memory.loc[LAYER].to_numpy().argmax())
a = memory.loc[LAYER].iloc[HEAD]
print(f"we follow layer {LAYER}, head {HEAD}: median a_t = {a:.2f}, half-life {np.log(0.5) / np.log(a):.1f} tokens")
'''),
    md('''
## The hook points of a recurrent layer

Hook names follow TransformerLens: `blocks.{layer}.{slot}.hook_{quantity}`. The recurrent mixer of every model
family sits in the slot `mixer`. We cache every hook of the chosen layer and print the shapes. Two hooks
(`hook_write_add`, `hook_post_read_add`) carry no activation: they exist so that a hook can add matrices to the
state (we use one below). `hook_state` is only computed when something listens to it, because the full trajectory
of states is large.
'''),
    code('''
names = [name for name in model.hook_dict if name.startswith(f"blocks.{LAYER}.")]
logits, cache = model.run_with_cache(tokens, names_filter=names)
for name in names:
    shape = tuple(cache[name].shape) if name in cache else "(edit hook: a hook adds matrices here; not cached)"
    print(f"{name:36s} {shape}")
'''),
    md('''
## Rebuild the recurrence from the cache

The write factors are cached per head: `hook_write_k` and `hook_write_v` are `[batch, pos, head, d]`,
`hook_write_beta` and `hook_decay` are `[batch, pos, head]`. `hook_state` is flattened row-major to
`[batch, pos, head, d_k * d_v]`; `unflatten` gives back the `d_k x d_v` matrices (key axis first).

We run the formula from the top of the notebook ourselves, token by token, for all heads at once, and compare with the
states and reads the model computed (with a faster chunked algorithm).
'''),
    code('''
mixer = f"blocks.{LAYER}.mixer."
k = cache[mixer + "hook_write_k"][0]          # [pos, head, d_k]  (unit norm)
v = cache[mixer + "hook_write_v"][0]          # [pos, head, d_v]
beta = cache[mixer + "hook_write_beta"][0]    # [pos, head]
decay = cache[mixer + "hook_decay"][0]        # [pos, head]       (log a_t)
q = cache[mixer + "hook_read_q"][0]           # [pos, head, d_k]
states = cache[mixer + "hook_state"][0].unflatten(-1, (cfg.d_k, cfg.d_v))  # [pos, head, d_k, d_v]
reads = cache[mixer + "hook_read"][0]         # [pos, head, d_v]

S = torch.zeros(cfg.n_heads, cfg.d_k, cfg.d_v)
identity = torch.eye(cfg.d_k)
rebuilt = []
for t in range(tokens.shape[1]):
    a_t = decay[t].exp()[:, None, None]
    b_t = beta[t][:, None, None]
    key_key = k[t][:, :, None] * k[t][:, None, :]     # k k^T, per head
    write = b_t * k[t][:, :, None] * v[t][:, None, :]  # beta k v^T, per head
    S = a_t * (identity - b_t * key_key) @ S + write
    rebuilt.append(S)
rebuilt = torch.stack(rebuilt)                               # [pos, head, d_k, d_v]
reads_from_states = torch.einsum("phkv,phk->phv", states, q)  # S_t^T q_t


def relative_error(x, reference):
    return ((x - reference).norm() / reference.norm()).item()


print(f"relative error, state recurrence: {relative_error(rebuilt, states):.2e}")
print(f"relative error, read = S^T q:     {relative_error(reads_from_states, reads):.2e}")
'''),
    md('''
Both errors are at the level of float32 rounding: the hooks really are the terms of the recurrence.

## Edit one write and watch the change travel

We change head `HEAD` at one position `T0` in two ways.

* **Write edit: $\\beta_{T_0} := 0$.** A hook on `hook_write_beta` returns a modified tensor. By the library's edit
  semantics this removes only the additive write $\\beta k v^\\top$ at $T_0$; the erase-and-decay step still uses
  the model's own $\\beta$ and $k$. The read at $T_0$ already sees the edited state.
* **After-read edit.** A hook on `hook_post_read_add` adds a matrix to the state *after* the read at $T_0$. We add
  $-\\beta k v^\\top$, so the state left behind is the same as with the write edit, but the output at $T_0$ is
  untouched. This is exactly "editing the cache between two decoding steps". The hook receives a sparse tensor
  `[batch, pos, head, d_k, d_v]` and returns it plus the matrices to add.

For each edit we measure, at every position, the size of the change of the head's state
$\\lVert S^{\\text{edit}}_t - S_t \\rVert_F$ and how much the next-token distribution moved,
$\\mathrm{KL}(p_t \\,\\Vert\\, p^{\\text{edit}}_t)$.
'''),
    code('''
T0 = 20
native_write = beta[T0, HEAD] * torch.outer(k[T0, HEAD], v[T0, HEAD])  # [d_k, d_v]


def zero_beta(beta, hook):                 # beta: [batch, pos, head]
    beta = beta.clone()
    beta[:, T0, HEAD] = 0.0
    return beta


def remove_after_read(additions, hook):    # sparse [batch, pos, head, d_k, d_v], empty unless a hook adds
    cell = torch.tensor([[0], [T0], [HEAD]])  # (batch row, position, head) of each matrix
    return additions + torch.sparse_coo_tensor(cell, -native_write[None], additions.shape)


edits = {
    "write edit": [(mixer + "hook_write_beta", zero_beta)],
    "after-read edit": [(mixer + "hook_post_read_add", remove_after_read)],
}


def kl_per_position(clean_logits, edited_logits):
    p = F.log_softmax(clean_logits[0].double(), dim=-1)   # float64: these KLs can be tiny
    q = F.log_softmax(edited_logits[0].double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


effects = {}
for label, hooks in edits.items():
    with model.hooks(fwd_hooks=hooks):
        edited_logits, edited_cache = model.run_with_cache(tokens, names_filter=mixer + "hook_state")
    change = edited_cache[mixer + "hook_state"][0] - cache[mixer + "hook_state"][0]  # [pos, head, d_k * d_v]
    other_heads = [h for h in range(cfg.n_heads) if h != HEAD]
    print(f"{label}: largest change in the other heads of the layer = {change[:, other_heads].abs().max():.1e}")
    effects[label] = {"state change": change[:, HEAD].norm(dim=-1), "KL": kl_per_position(logits, edited_logits)}

window = list(range(T0 - 2, T0 + 6))
columns = {(label, what): values[window].numpy() for label, e in effects.items() for what, values in e.items()}
pd.DataFrame(columns, index=pd.Index(window, name="position")).map(lambda x: f"{x:.2e}")
'''),
    md('''
The library also has helpers that build these hooks for you (plain functions that return `fwd_hooks` lists):
`interventions.delete_write(layer, cells, timing=...)` removes the native write at the given
`(batch row, position, head)` cells, at the write (`timing="write"`) or after the read (`timing="after_read"`).
They give the same outputs as our hand-written hooks, up to float32 rounding (the helper subtracts the write as a
matrix, our hook changes $\\beta$):
'''),
    code('''
cells = [(0, T0, HEAD)]
for timing, label in [("write", "write edit"), ("after_read", "after-read edit")]:
    with model.hooks(fwd_hooks=edits[label]):
        by_hand = model(tokens)
    by_helper = model.run_with_hooks(tokens, fwd_hooks=interventions.delete_write(LAYER, cells, timing=timing))
    difference = (by_hand - by_helper).abs().max()
    print(f"{timing:>10}: largest logit difference, hand-written hook vs helper = {difference:.1e}")
'''),
    md('''
Now the whole passage. The y axes are logarithmic; exact zeros (positions before the edit) are drawn on the floor
of the plot, at $10^{-12}$.
'''),
    code('''
FLOOR = 1e-12
positions = np.arange(tokens.shape[1])
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for label, effect in effects.items():
    axes[0].semilogy(positions, np.maximum(effect["state change"].numpy(), FLOOR), marker=".", label=label)
    axes[1].semilogy(positions, np.maximum(effect["KL"].numpy(), FLOOR), marker=".", label=label)
axes[0].set_title(f"change of the state, layer {LAYER} head {HEAD}: ||S_edit - S||_F")
axes[1].set_title("change of the next-token distribution: KL(p || p_edit)")
for ax in axes:
    ax.axvline(T0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("position")
    ax.legend(fontsize="small")
fig.tight_layout()
fig.savefig(OUT / "01_edit_propagation.png", dpi=120)
plt.show()
print("saved", OUT / "01_edit_propagation.png")
'''),
    md('''
What the plot shows:

* **Nothing changes before $T_0$.** The model is causal.
* **At $T_0$ the two edits differ.** The write edit changes the state at $T_0$, and the read at $T_0$ sees it, so the
  prediction at $T_0$ moves. The after-read edit leaves the state *seen by the read* and the output at $T_0$ alone
  (its KL at $T_0$ is exactly 0).
* **After $T_0$ the change of the state is the same for both edits.** Both leave the same edited state behind, and
  the recurrence is linear in the state, so the difference is carried forward by the same $a_t(I - \\beta_t k_t
  k_t^\\top)$ factors and shrinks at roughly the rate of the decay (the head's memory).
* **The KL after $T_0$ still differs a little.** With the write edit the layer's output at $T_0$ changed too, and
  later layers (the attention layer can look back at position $T_0$) carry that along.
* **The KL fades more slowly than the state change.** The change of this head's state dies out, but the later layers
  keep it alive: the attention layer looks back at the positions just after $T_0$, where the change was large (and
  when the edited layer is not the last recurrent one, the later recurrent layers carry it in their own states).

## Generate with an edit switched on

Hooks stay active during `model.generate`: the prompt is one forward call, then every new token is one forward call
with a single position (the recurrent layers continue from their cached state, O(1) work per token). A hook that
indexes positions would see position 0 at every decoding step, so for generation we use an edit that applies at
every position: the chosen head never writes ($\\beta := 0$ everywhere; its state stays zero). For comparison we
also silence the whole layer.
'''),
    code('''
prompt = "On the morning appointed for"


def silence_head(beta, hook):
    beta = beta.clone()
    beta[:, :, HEAD] = 0.0
    return beta


def silence_layer(beta, hook):
    return torch.zeros_like(beta)


print("native:           ", repr(model.generate(prompt, max_new_tokens=30, do_sample=False, verbose=False)))
for label, hook in [(f"head {HEAD} silenced:", silence_head), (f"layer {LAYER} silenced:", silence_layer)]:
    with model.hooks(fwd_hooks=[(mixer + "hook_write_beta", hook)]):
        print(f"{label:18s}", repr(model.generate(prompt, max_new_tokens=30, do_sample=False, verbose=False)))
'''),
    md('''
Greedy decoding amplifies small changes: once one token differs, the rest of the text follows a different path.

**Next:** `02_training_a_writesae.ipynb` trains a sparse autoencoder whose dictionary entries have the shape of a
write, rank-1 matrices $p\\,q^\\top$, on the states of one of these heads.
'''),
]

# ---------------------------------------------------------------------------------------------------------------------
# 02: training a WriteSAE
# ---------------------------------------------------------------------------------------------------------------------

TRAIN = '''
CONTEXT, STEPS, BATCH_PROMPTS = 64, 200, 8
documents = load_heldout_documents()
eval_docs = documents[::5]                                        # every fifth document: evaluation
train_docs = [doc for i, doc in enumerate(documents) if i % 5]    # the rest: SAE training
eval_tokens = torch.stack([model.to_tokens(doc[:2000], prepend_bos=False)[0, :CONTEXT] for doc in eval_docs])
print(f"{len(train_docs)} training documents; evaluation passages {tuple(eval_tokens.shape)}")
'''



def runner_cell(folder: str) -> str:
    return RUNNER.replace("SAE_FOLDER", folder)


RUNNER = '''
SAE_DIR = OUT / "SAE_FOLDER"
shutil.rmtree(SAE_DIR, ignore_errors=True)  # the runner saves into this folder and refuses a non-empty one
sae_cfg = ws.WriteTopKTrainingSAEConfig(
    d_in=cfg.d_k * cfg.d_v, d_k=cfg.d_k, d_v=cfg.d_v,   # the flattened d_k x d_v state of one head
    d_sae=256, k=8,                                    # 256 atoms, 8 active per state
    rank=1, encoder_kind="bilinear",                   # atoms p q^T; encoder scores u^T (S - b) w + b_enc
)
runner_cfg = LanguageModelSAERunnerConfig(
    sae=sae_cfg,
    model_name="qwen35-tiny", hook_name=f"blocks.{LAYER}.mixer.hook_state", hook_head_index=HEAD,
    dataset_path="heldout-train-split", is_dataset_tokenized=False, streaming=False,
    context_size=CONTEXT, prepend_bos=False,
    training_tokens=STEPS * BATCH_PROMPTS * CONTEXT, train_batch_size_tokens=BATCH_PROMPTS * CONTEXT,
    n_batches_in_buffer=16, store_batch_size_prompts=8,
    lr=3e-3, dead_feature_window=100, feature_sampling_window=200,
    device="cpu", seed=0, verbose=False,
    logger=LoggingConfig(log_to_wandb=False), output_path=str(SAE_DIR),
)
runner = LanguageModelSAETrainingRunner(
    runner_cfg, override_model=model, override_dataset=datasets.Dataset.from_dict({"text": train_docs})
)
start = time.perf_counter()
runner.run()
print(f"trained {STEPS} steps in {time.perf_counter() - start:.1f} s; saved to {SAE_DIR}")
'''

NB02 = [
    md(r'''
# 2. Training a WriteSAE

A sparse autoencoder (SAE) rewrites an activation as a sparse sum of dictionary entries ("atoms"). A **WriteSAE** is
an SAE on the state $S_t$ of one recurrent head whose atoms have the shape of a write: each atom is a rank-1
$d_k \times d_v$ matrix $A_i = p_i q_i^\top$, with a **key-side factor** $p_i$ and a **value-side factor** $q_i$.
It encodes a state into coefficients $c_i \ge 0$ (at most $k$ non-zero) and decodes

$$\hat S_t = b + \sum_i c_i\, p_i q_i^\top .$$

Since a write is $\beta_t k_t v_t^\top$, an atom can be compared with the write directly: is $p_i$ close to the key
$k_t$ and $q_i$ close to the value $v_t$ where the atom fires?

In this notebook you will:

1. train a small WriteSAE with SAELens' own training loop (`LanguageModelSAETrainingRunner`) on one head's
   `hook_state` of the shipped model;
2. load it back with `sae_lens.SAE.load_from_disk` and measure it with `evaluate_state_sae`;
3. look at the most frequent atoms: their key and value factors, how they line up with the native keys and values,
   and the tokens where they fire.

Training takes about 10-20 seconds on one CPU core.
'''),
    code(setup_cell('''
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import datasets
import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

import writesae_lens.saes as ws   # importing it registers the WriteSAE architectures with SAELens
from writesae_lens.adapters import HookedQwen35
from writesae_lens.data import load_heldout_documents, pretrained_path
from writesae_lens.evaluation.sae_evals import evaluate_state_sae
''')),
    md('''
## Model, data and the head to study

We use the held-out documents shipped with the library: every fifth document is kept for evaluation, the others
feed the SAE. As in notebook 01 we study the recurrent head with the longest memory (largest median decay factor
$a_t$), whose state holds more than the current write.
'''),
    code('''
model = HookedQwen35.from_pretrained(pretrained_path("qwen35-tiny"))
cfg = model.cfg
''' + TRAIN + "\n" + PICK_HEAD + '''

memory = head_memory(model, eval_tokens)
LAYER = int(memory.max(axis=1).idxmax())
HEAD = int(memory.loc[LAYER].to_numpy().argmax())
print(f"layer {LAYER}, head {HEAD}: median a_t = {memory.loc[LAYER].iloc[HEAD]:.2f}")
'''),
    md('''
## Train with SAELens' runner

The WriteSAE configs are ordinary SAELens configs (`WriteTopKTrainingSAEConfig` is the TopK architecture with
rank-1 atoms), so SAELens' runner trains them unchanged. What it needs:

* `hook_name="blocks.{layer}.mixer.hook_state"` and `hook_head_index=head`: SAELens takes one head's flattened
  state, `d_in = d_k * d_v` numbers per position;
* the hooked model as `override_model` (SAELens cannot build it from a name) and the text as a local
  `datasets.Dataset` (`override_dataset`);
* `LoggingConfig(log_to_wandb=False)` to stay offline, and an `output_path` for the trained SAE.

The sizes are tiny so that this runs in seconds: contexts of 64 tokens, 200 steps of 512 states.
'''),
    code(runner_cell("02_writesae")),
    md('''
## Load it back and evaluate

`SAE.load_from_disk` finds the WriteSAE class through SAELens' registry. The SAE remembers where it was trained
(`cfg.metadata.hook_name`, `cfg.metadata.hook_head_index`), which `evaluate_state_sae` uses. Its metrics, on the
evaluation passages:

* `explained_variance`, `mse`, `l0`: reconstruction quality of the head's states and the number of active atoms;
* `ce_loss_clean` / `ce_loss_spliced` / `ce_loss_zero`: next-token loss of the model as it is, with the head's states
  replaced by their reconstructions, and with them replaced by zeros; `ce_loss_score` is the fraction of the
  zero-ablation damage that the reconstruction avoids (1 is perfect);
* `kl_div_spliced` / `kl_div_zero`: the same comparisons as KL divergences from the clean predictions.
'''),
    code('''
torch.set_grad_enabled(False)  # training is done: from here on we only run models
sae = SAE.load_from_disk(SAE_DIR)
print(type(sae).__name__, "trained on", sae.cfg.metadata.hook_name, "head", sae.cfg.metadata.hook_head_index)
metrics = evaluate_state_sae(model, sae, eval_tokens)
for name, value in metrics.items():
    print(f"{name:20s} {value:.4g}")
'''),
    md('''
## The atoms

The decoder is stored factored: `W_dec_key` is `[d_sae, rank, d_k]` (the $p_i$) and `W_dec_value` is
`[d_sae, rank, d_v]` (the $q_i$); the factors are kept at unit norm during training. We encode the states of the
evaluation passages and rank the atoms by how often they fire.
'''),
    code('''
mixer = f"blocks.{LAYER}.mixer."
names = [mixer + n for n in ("hook_state", "hook_write_k", "hook_write_v", "hook_write_beta")]
_, cache = model.run_with_cache(eval_tokens, names_filter=names)
states = cache[mixer + "hook_state"][:, :, HEAD]     # [passage, pos, d_k * d_v]
keys = cache[mixer + "hook_write_k"][:, :, HEAD]     # [passage, pos, d_k]
values = cache[mixer + "hook_write_v"][:, :, HEAD]   # [passage, pos, d_v]
betas = cache[mixer + "hook_write_beta"][:, :, HEAD] # [passage, pos]
codes = sae.encode(states)                           # [passage, pos, d_sae]

firing_rate = (codes > 0).float().mean(dim=(0, 1))
top_atoms = firing_rate.argsort(descending=True)[:5].tolist()
print(f"{int((firing_rate > 0).sum())} of {sae.cfg.d_sae} atoms fire on the evaluation passages")
print("most frequent atoms:", top_atoms)

p = sae.W_dec_key[:, 0]     # [d_sae, d_k]  key-side factors (rank 1)
q = sae.W_dec_value[:, 0]   # [d_sae, d_v]  value-side factors
print("factor norms of those atoms:", [(round(p[i].norm().item(), 3), round(q[i].norm().item(), 3)) for i in top_atoms])
'''),
    md('''
### Do the atoms look like the writes they fire on?

For each frequent atom we compare its factors with the native write factors at the positions where it fires:
the cosine of $p_i$ with the key $k_t$ and of $q_i$ with the value $v_t$. A rank-1 matrix does not fix the sign of
its factors ($p q^\\top = (-p)(-q)^\\top$), so we average absolute cosines and report separately how often the two
cosines have the same sign (the atom then points the same way as the write $\\beta_t k_t v_t^\\top$, since
$\\beta_t > 0$ and the SAE's coefficients are positive). As a baseline, the same averages over the positions where
the atom does *not* fire.
'''),
    code('''
rows = []
for i in top_atoms:
    fires = codes[..., i] > 0
    cos_key = F.cosine_similarity(keys, p[i].expand_as(keys), dim=-1)        # [passage, pos]
    cos_value = F.cosine_similarity(values, q[i].expand_as(values), dim=-1)
    rows.append({
        "atom": i,
        "firing rate": firing_rate[i].item(),
        "|cos(p, k)| firing": cos_key[fires].abs().mean().item(),
        "|cos(p, k)| not firing": cos_key[~fires].abs().mean().item(),
        "|cos(q, v)| firing": cos_value[fires].abs().mean().item(),
        "|cos(q, v)| not firing": cos_value[~fires].abs().mean().item(),
        "same sign, firing": (cos_key * cos_value)[fires].gt(0).float().mean().item(),
    })
pd.DataFrame(rows).set_index("atom").round(2)
'''),
    md('''
A picture of the most frequent atom at its strongest firing: the atom $c\\,p q^\\top$ (at the coefficient the SAE gave
it there), the native write $\\beta_t k_t v_t^\\top$ at that position, and the state itself. (With a long-memory head
the state also holds older writes, so the atom need not match the current write exactly.)
'''),
    code('''
atom = top_atoms[0]
passage, position = divmod(int(codes[..., atom].argmax()), codes.shape[1])
coefficient = codes[passage, position, atom]
k_t, v_t, beta_t = keys[passage, position], values[passage, position], betas[passage, position]
pictures = {
    f"atom {atom}: c p q^T (c = {coefficient:.3f})": coefficient * torch.outer(p[atom], q[atom]),
    "native write beta k v^T": beta_t * torch.outer(k_t, v_t),
    "state S_t": states[passage, position].reshape(cfg.d_k, cfg.d_v),
}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
for ax, (title, matrix) in zip(axes, pictures.items()):
    limit = matrix.abs().max().item()
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(title, fontsize="small")
    ax.set_xlabel("value axis (d_v)")
    ax.set_ylabel("key axis (d_k)")
    fig.colorbar(image, ax=ax, shrink=0.8)
fig.tight_layout()
fig.savefig(OUT / "02_atom_and_write.png", dpi=120)
plt.show()
'''),
    md('''
### Where do the atoms fire?

The state at position $t$ is the state right after the token at $t$ was written, so we show each firing as a little
left context followed by the token at $t$ in brackets, strongest firings first, and the tokens an atom fires on
most often. Tokens are decoded with `model.to_string`.
'''),
    code('''
def show(passage, position, width=6):
    context = model.to_string(eval_tokens[passage, max(0, position - width):position])
    token = model.to_string(eval_tokens[passage, position:position + 1])
    return (context + "[" + token + "]").replace("\\n", "\\\\n")


for i in top_atoms:
    passages, positions = torch.nonzero(codes[..., i] > 0, as_tuple=True)
    strongest = codes[passages, positions, i].argsort(descending=True)[:4].tolist()
    common = Counter(model.to_str_tokens(eval_tokens[passages, positions])).most_common(5)
    print(f"atom {i} ({len(passages)} firings). most common tokens: {common}")
    for j in strongest:
        print(f"    {codes[passages[j], positions[j], i]:.3f}  {show(int(passages[j]), int(positions[j]))}")
'''),
    md('''
With a model this small and 200 training steps the atoms are rough, but you can already see the two things a
WriteSAE is for: its atoms are write-shaped objects that can be compared with the native $k_t$ and $v_t$, and each
one is tied to the tokens whose writes it captures.

**Next:** `03_the_substitution_test.ipynb` puts atoms *in place of* the native writes and measures whether the model
notices.
'''),
]

# ---------------------------------------------------------------------------------------------------------------------
# 03: the substitution test
# ---------------------------------------------------------------------------------------------------------------------

NB03 = [
    md(r'''
# 3. The substitution test

An SAE can reconstruct states well and still be a poor description of what the model *does* with them. The
substitution test asks a causal question: at a position where an atom fires, if we put the atom **in place of** the
native write, does the model behave as before?

At each firing (a position $t$ where the SAE's code of the head's state is non-zero) the native write
$\Delta = \beta_t k_t v_t^\top$ is replaced by one of three things:

* **atom**: $c\,A_{i^*}$, the strongest active atom at its own coefficient;
* **delete**: nothing (the write is removed);
* **random**: another alive atom that is not active at $t$, scaled to the same norm as the atom condition.

For each condition we measure the KL divergence between the native and the edited next-token distributions. If the
atom captures what the write contributes, $\mathrm{KL}_\text{atom} < \mathrm{KL}_\text{delete}$ at most firings (the
**win rate**), and the random atom does worst.

In this notebook you will train a small WriteSAE (as in notebook 02), run `replacement_test`, read the record table
and the statistical summary, draw the two standard figures, and see what the edit timing and the place where the KL
is read change.
'''),
    code(setup_cell('''
import os
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import pandas as pd
import torch
from IPython.display import Image, display
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

import writesae_lens.saes as ws
from writesae_lens.adapters import HookedQwen35
from writesae_lens.data import load_heldout_documents, pretrained_path
from writesae_lens.evaluation.plots import plot_kl_scatter, plot_log_ratio_density
from writesae_lens.evaluation.stats import format_summary, summarize
from writesae_lens.evaluation.substitution import replacement_test
''')),
    md('''
## A WriteSAE to test

The same recipe as notebook 02, on the head with the longest memory. Memory matters here: the paper's protocol edits
the state *after* the read at $t$, so the edit reaches the output only through the next steps of the recurrence. On a
head that forgets everything at every token ($a_t \\approx 0$) the edit would vanish before any output sees it.
'''),
    code('''
model = HookedQwen35.from_pretrained(pretrained_path("qwen35-tiny"))
cfg = model.cfg
''' + TRAIN + "\n" + PICK_HEAD + '''

memory = head_memory(model, eval_tokens)
LAYER = int(memory.max(axis=1).idxmax())
HEAD = int(memory.loc[LAYER].to_numpy().argmax())
print(f"layer {LAYER}, head {HEAD}: median a_t = {memory.loc[LAYER].iloc[HEAD]:.2f}")
'''),
    code(runner_cell("03_writesae") + '''
torch.set_grad_enabled(False)  # training is done: from here on we only run models
sae = SAE.load_from_disk(SAE_DIR)
'''),
    md('''
## Run the test

`replacement_test(model, sae, layer, head, tokens)` encodes the head's state at every position of every passage,
picks firings (at most `max_firings_per_feature` per feature, `max_firings` in all), runs the three conditions for each
and returns one record per firing. It is exact (the same numbers as editing with hooks on the whole passage) but
batched: the layers before the edited one run once per passage, and each edited row restarts from a cached state.

The defaults follow the paper: `timing="after_read"` and `kl_at="next"` (explained below), `amplitude="natural"`
(the atom at its SAE coefficient; `"native_norm"` rescales it to the norm of the native write).
'''),
    code('''
start = time.perf_counter()
records = replacement_test(model, sae, LAYER, HEAD, eval_tokens,
                           max_firings_per_feature=3, max_firings=120, progress=False)
print(f"{len(records)} firings tested in {time.perf_counter() - start:.1f} s")
records["token"] = [model.to_string(eval_tokens[p, t:t + 1]) for p, t in zip(records.passage, records.position)]
records[["passage", "position", "token", "feature", "atom", "coefficient", "native_write_norm",
         "kl_atom", "kl_delete", "kl_random", "top1_native", "top1_atom", "top1_delete"]].head(10)
'''),
    md('''
The columns: where the firing is (`passage`, `position`, the token there), which feature fired (`feature`) and which
atom was substituted (`atom`, the strongest active one, at `coefficient`), the norm of the native write, the three
KLs $\\mathrm{KL}(p_\\text{native} \\Vert p_\\text{condition})$ (the `*_rev` columns hold the other direction), and
the top-1 token under each condition. A record is a firing of one feature: when several sampled features fire at the
same position they share the same substitution (the strongest atom there), so their KLs are equal.

## The summary

`summarize` computes the paper's statistics from the records; `format_summary` prints them:

* the **win rate** (fraction of firings with $\\mathrm{KL}_\\text{atom} < \\mathrm{KL}_\\text{delete}$) with a Wilson
  interval, and bootstrap intervals that resample whole features or whole passages (firings of one feature, or in
  one passage, are not independent);
* the **strict chain** rate, atom < delete < random;
* effect sizes and tests on the paired differences: Cliff's delta, a Wilcoxon signed-rank test, a sign-flip
  permutation test;
* a **per-atom** view (the win rate atom by atom, for atoms with enough firings);
* the median KL of each condition.

The resampling counts are small here to keep the notebook fast; use the defaults (thousands) for real results.
'''),
    code('''
summary = summarize(records, n_cluster_resamples=300, n_permutations=1000, n_atom_resamples=300, min_firings_per_atom=3)
print(format_summary(summary))
'''),
    md('''
With a tiny model, a 200-step SAE and about a hundred firings, expect a modest win rate and wide intervals: the
test is only as good as the SAE, and this notebook shows the mechanics rather than a result.

## The two figures

`plot_kl_scatter` draws $\\mathrm{KL}_\\text{delete}$ and $\\mathrm{KL}_\\text{random}$ against
$\\mathrm{KL}_\\text{atom}$ on log-log axes, one point per firing: points above the diagonal are firings where the
atom beat the condition. `plot_log_ratio_density` shows the distribution of
$\\log_{10}(\\mathrm{KL}_\\text{condition} / \\mathrm{KL}_\\text{atom})$: mass to the right of 0 is the same
thing. Each function writes a PNG and returns its path.
'''),
    code('''
scatter = plot_kl_scatter(records, OUT / "03_kl_scatter.png")
density = plot_log_ratio_density(records, OUT / "03_log_ratio_density.png")
display(Image(filename=str(scatter), width=450), Image(filename=str(density), width=520))
'''),
    md('''
## When the edit happens, and where the KL is read

**Timing** (`timing`):

* `"after_read"` (the paper's protocol): the substitution is applied to the state *after* the read at $t$. The output
  at $t$ is unchanged, the first output that can change is the one at $t+1$. This is the same as editing the model's
  cache between two decoding steps, and it tests the atom as *memory*: what the rest of the sequence reads from it.
* `"write"`: the write at $t$ itself is replaced, so the read at $t$ already sees the atom and the output at $t$ can
  change. This also tests what the current token reads back immediately.

**Where the KL is read** (`kl_at`):

* `"next"`: at the first output the edit can change ($t + 1$ for `after_read`, $t$ for `write`). This is where the
  effect is largest.
* `"end"`: at the passage's last position, with the tokens in between fed as they are (teacher forcing). This asks
  whether the edit still matters much later; the decay of the head shrinks it step by step, so these KLs are much
  smaller. (KLs this small approach the float32 precision of the logits; firings whose KL comes out $\\le 0$ cannot sit
  on log axes and are left out of the figures, which count them.)

We run the four combinations on the same passages, with fewer firings.
'''),
    code('''
rows = []
for timing in ("after_read", "write"):
    for kl_at in ("next", "end"):
        table = replacement_test(model, sae, LAYER, HEAD, eval_tokens, max_firings_per_feature=2, max_firings=60,
                                 timing=timing, kl_at=kl_at, progress=False)
        rows.append({
            "timing": timing, "kl_at": kl_at, "firings": len(table),
            "win rate": (table.kl_atom < table.kl_delete).mean(),
            "median KL atom": table.kl_atom.median(),
            "median KL delete": table.kl_delete.median(),
            "median KL random": table.kl_random.median(),
            "KLs <= 0": int((table[["kl_atom", "kl_delete", "kl_random"]] <= 0).to_numpy().sum()),
        })
pd.DataFrame(rows).set_index(["timing", "kl_at"]).map(lambda x: f"{x:.3g}" if isinstance(x, float) else x)
'''),
    md('''
Things to notice: the KLs with `timing="write"` are larger than with `"after_read"` at `kl_at="next"` (the edit is
read at once instead of after one step of decay), and the KLs at `kl_at="end"` are orders of magnitude smaller than
at `"next"`.

To go further: train a larger SAE for longer (the paper uses 2048 atoms, $k=32$, contexts of 1,024 tokens), test
many more firings, save the records with `writesae_lens.evaluation.records.save_records`, and summarize with the
default resampling counts.
'''),
]

NOTEBOOKS = {
    "01_the_write_and_its_hooks.ipynb": NB01,
    "02_training_a_writesae.ipynb": NB02,
    "03_the_substitution_test.ipynb": NB03,
    **chapter_notebooks(),  # 04 on: one module per notebook in tutorials/chapters/
}


def build(name: str):
    """The notebook `name` as an nbformat object, without outputs, with stable cell ids."""
    notebook = new_notebook(cells=[cell.copy() for cell in NOTEBOOKS[name]])
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{name[:2]}-{index:02d}"
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.validate(notebook)
    return notebook


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NOTEBOOKS:
        path = folder / name
        nbformat.write(build(name), path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print("wrote", path)
