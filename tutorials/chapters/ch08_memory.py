"""Notebook 08: the memory report (how long each head keeps what it writes, and whether that matters)."""

from cells import code, md, setup_cell

NOTEBOOK = "08_the_memory_report.ipynb"

CELLS = [
    md(r'''
# 8. How long does a head remember?

A recurrent head keeps a matrix state and updates it at every token,

$$S_t = T_t\,S_{t-1} + \beta_t\,k_t v_t^\top ,$$

where the transition $T_t$ is $a_t I$ for Mamba-2, $a_t (I - \beta_t k_t k_t^\top)$ for Gated DeltaNet and
$\mathrm{diag}(e^{w_t}) - \hat a_t \hat b_t^\top$ (a decay per key channel) for RWKV-7. A matrix memory is only
interesting when the state holds more than the current write: a head whose decay is near zero forgets everything at
the next token, and an SAE on its state learns little more than an SAE on its write.

`writesae_lens.evaluation.memory.memory_report` measures, per head:

- the per-token decay $a_t = e^{\text{decay}_t}$ (quantiles over tokens, and key channels for RWKV-7);
- the **write share** $\lVert\beta_t k_t v_t^\top\rVert / \lVert S_t\rVert$: 1 means the state is only the current
  write;
- the **memory length**: the write at a source position $s$ is propagated *alone* through the head's own transitions
  (every other write of the layer deleted), and we record the first lag $j$ at which
  $\lVert T_{s+j}\cdots T_{s+1} W_s\rVert / \lVert W_s\rVert$ falls below 10 %;
- the **logit effect**: the KL divergence of the next-token distribution when the head's state is zeroed at every
  read, or cut down to the current write (what the memory of earlier tokens adds).

The same report is the `writesae inspect` command.
'''),
    code(setup_cell('''
import os
import tempfile
from pathlib import Path

import torch
from IPython.display import Image, display

from writesae_lens import pipeline
from writesae_lens.data import load_heldout_documents
from writesae_lens.evaluation.memory import MemorySettings, choose_demo_cell, memory_report, write_contributions
from writesae_lens.evaluation.memory_plots import plot_memory_report
from writesae_lens.models import load_hooked_model
''', no_grad=True)),
    md('''
## The report of the shipped Qwen3.5, Mamba-2 and RWKV-7 models

Two held-out passages of 160 tokens (enough for a first look; `writesae inspect` defaults to 8 of 256); statistics
from position 32 on; writes followed for up to 64 tokens.
'''),
    code('''
settings = MemorySettings(first_position=32, max_lag=64, sources_per_passage=2, batch_size=16)
reports = {}
for name in ("qwen35-tiny", "mamba2-tiny", "rwkv7-tiny"):
    model = load_hooked_model(name)
    tokens = pipeline.token_passages(model, load_heldout_documents(), 2, 160)
    reports[name] = memory_report(model, tokens, settings, progress=False)
    table = reports[name].table
    print(f"{name}: median decay {table.decay_q50.median():.2f}, median write share {table.write_share.median():.2f}, "
          f"heads keeping a write >= 10 tokens: {(table.memory_length >= 10).sum()} of {len(table)}")
reports["qwen35-tiny"].table.round(3)
'''),
    md('''
The columns: `decay_q10/q50/q90` are quantiles of $a_t$; `write_share` is a median over tokens; `memory_length` is a
median over source positions, and `max_lag + 1` (here 65) means the write kept more than 10 % of its norm for the
whole window (`memory_censored` is the fraction of sources for which that happened); `kl_zero` and `kl_memory` are in
nats per token.

The figure shows, for every head, the median contribution of a write against the lag (left), and the memory length
against what the memory does to the logits (right).
'''),
    code('''
for name, report in reports.items():
    figure = plot_memory_report(report, OUT / f"08_memory_{name}.png", title=name)
    display(Image(filename=str(figure), width=820))
'''),
    md('''
## Checking one head by hand

For Mamba-2 the transition is a scalar, so the contribution of a write after $j$ tokens is exactly the product of the
$j$ decays that follow it. `write_contributions` returns the propagated contributions themselves; here we compare one
source with the product of the cached decays.
'''),
    code('''
model = load_hooked_model("mamba2-tiny")
tokens = pipeline.token_passages(model, load_heldout_documents(), 1, 160)
layer, head = 0, 2
contributions, sources = write_contributions(model, tokens, layer, settings)
_, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.mixer.hook_decay"])
decay = cache[f"blocks.{layer}.mixer.hook_decay"][0, :, head].double()      # [pos]
passage, s = sources[0]
product = torch.exp(torch.cumsum(decay[s + 1 : s + 1 + settings.max_lag], 0))  # a_{s+1} ... a_{s+j}
shown = product > 1e-6                                                       # lags where fp32 still resolves it
error = ((contributions[head, 0] - product).abs() / product)[shown].max().item()
print(f"source position {s}, lags 1-{int(shown.sum())}: largest relative difference from the product of decays = "
      f"{error:.2e}")
'''),
    md('''
## Choosing a cell for the demo

`choose_demo_cell` picks, among the heads whose memory moves the logits at least as much as the median head's, the one
whose writes last longest, and says why. Heads whose write is under 5 % of their state are left out first
(`min_write_share`): the test replaces the write, and a write that small hardly matters. A firing-density function
(from an SAE) can exclude cells where no feature fires; `writesae demo` goes one step further
(`writesae_lens.evaluation.demo_cell.train_on_a_live_cell`): it trains the SAE on the proposed cell and moves to the
next one when under 10 % of the dictionary fires on its test passages.
'''),
    code('''
for name, report in reports.items():
    layer, head, reason = choose_demo_cell(report=report)
    print(f"{name}: layer {layer}, head {head}\\n  {reason}")
'''),
    md('''
From the command line: `writesae inspect --model qwen35-tiny --out memory-report/` writes the table (`memory.csv`),
the curves (`curves.csv`), the figure and a summary with the suggested cell. The model card
(`writesae_lens/data/models/MODEL_CARD.md`) lists the report of every shipped model, as measured.
'''),
]
