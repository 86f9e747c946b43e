"""Notebook 04: the closed-form logit shift and its audit."""

from cells import code, md, setup_cell

NOTEBOOK = "04_the_closed_form.ipynb"

CELLS = [
    md(r'''
# 4. The closed-form logit shift

Add a small multiple of an atom $A_i = p_i q_i^\top$ to one head's state after the write at $t_0$. How much does the
logit of a token change at a later position $t = t_0 + h$? The WriteSAE paper gives a closed form:

$$\Delta\ell_\text{tok}(t) \approx \varepsilon \; G \; \langle p_i, q_t\rangle \; \langle W_O[h]\,q_i,\ W_U[\text{tok}]\rangle,
\qquad G = \prod_{s=t_0+1}^{t} a_s .$$

Reading it from right to left: the value-side factor $q_i$ goes through the head's block of the output projection
and lands on the token's unembedding; the read at $t$ sees the atom through the query, $\langle p_i, q_t\rangle$; and
the decays between $t_0$ and $t$ shrink the perturbation by $G$ (the delta rule's erase term is dropped). No
parameter is fitted. The paper reports $R^2 = 0.98$ on Qwen3.5-0.8B and a negative $R^2$ on Mamba-2.

This notebook measures the shift exactly, computes the paper's prediction and the *exact first-order* shift (the
Jacobian-vector product of the logits along the perturbation), and compares the three, with
`writesae_lens.evaluation.closed_form.logit_shift_audit`.
'''),
    code(setup_cell('''
import os
import tempfile
from pathlib import Path

import torch
from IPython.display import Image, display

from writesae_lens import interventions, pipeline
from writesae_lens.evaluation.closed_form import logit_shift_audit
from writesae_lens.evaluation.closed_form_plots import plot_measured_vs_predicted, plot_r2_by_horizon, plot_r2_by_rank
from writesae_lens.evaluation.closed_form_summary import format_audit_summary, summarize_audit
from writesae_lens.evaluation.state_perturbation import StatePerturbations
from writesae_lens.models import load_hooked_model
''')),
    md('''
## A model, a WriteSAE, prompts

The shipped tiny Qwen3.5-architecture model, a small WriteSAE trained through SAELens on layer 1, head 0 (seconds),
and held-out prompts of 32 tokens: the logits are read at each prompt's last position $t$.
'''),
    code('''
model = load_hooked_model("qwen35-tiny")
LAYER, HEAD = 1, 0
train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
settings = pipeline.TrainSettings(layer=LAYER, head=HEAD, d_sae=128, k=8, context_size=128,
                                  training_tokens=128 * 16 * 60, batch_tokens=128 * 16, lr=2e-3, warmup_steps=10)
sae = pipeline.train_state_sae(model, train_docs, settings, OUT / "04_writesae")
torch.set_grad_enabled(False)
prompts = pipeline.token_passages(model, eval_docs, 40, 32)
print("prompts:", tuple(prompts.shape), " SAE:", sae.cfg.d_sae, "atoms")
'''),
    md('''
## One perturbation, three ways

`StatePerturbations` is the engine behind the audit. It runs the layers before the perturbed one once per prompt,
keeps cache snapshots at every $t_0$, and then runs many perturbed rows from those snapshots: the exact shift with
`logits`, and the exact first-order shift with `first_order` (forward-mode automatic differentiation, one pass).

The perturbation is added to $S_{t_0}$ after the write at $t_0$: the read at $t_0$ already sees it. That is what the
hook helper `interventions.add_to_state(..., timing="write")` does on the whole prompt, so we can check one against the
other.
'''),
    code('''
engine = StatePerturbations(model, LAYER, HEAD, prompts[:4], horizons=[0, 4])
group = next(engine.groups())
atom = sae.W_dec_key[0, 0][:, None] * sae.W_dec_value[0, 0][None, :]     # A_0 = p q^T, [d_k, d_v]
rows = torch.tensor([0, 1])
eps = 0.05
shift = engine.logits(group, 4, rows, eps * atom.expand(2, -1, -1)) - engine.logits(group, 4, rows, 0 * atom.expand(2, -1, -1))
_, slope = engine.first_order(group, 4, rows, atom.expand(2, -1, -1))

t0 = prompts.shape[1] - 1 - 4
hooked = model.run_with_hooks(prompts[:2], fwd_hooks=interventions.add_to_state(LAYER, [(0, t0, HEAD), (1, t0, HEAD)], eps * atom, timing="write"))
reference = hooked[:, -1] - model(prompts[:2])[:, -1]
print(f"engine vs hook path, largest difference: {(shift - reference).abs().max():.2e}")
print(f"first-order vs measured at eps = {eps}: largest difference {(eps * slope - shift).abs().max():.2e} "
      f"(shifts up to {shift.abs().max():.2e})")
'''),
    md('''
## The audit

`logit_shift_audit` draws alive atoms (atoms that fire on these prompts), perturbs every prompt at every horizon by
every $\\varepsilon$ of the grid, and records the three numbers at each atom's 64 *eval tokens* (the tokens with the
largest $|\\langle W_O[h] q_i, W_U[\\text{tok}]\\rangle|$). A small run here: 8 atoms, horizons 0 and 4, 16 eval tokens.
The paper's protocol (`writesae closed-form` defaults) is 50 atoms, $\\varepsilon \\in \\{0.1, 0.3, 1, 3\\}$, 500
prompts and 64 eval tokens.
'''),
    code('''
result = logit_shift_audit(model, sae, LAYER, HEAD, prompts, n_atoms=8, horizons=(0, 4), n_eval_tokens=16,
                           n_sign_trials=200, progress=False)
result.records.head()
'''),
    md('''
The summary reports, per horizon and predictor, the $R^2$ across prompts of each cell (atom, $\\varepsilon$, horizon,
eval rank) at the top-1 eval token: **free** is the paper's formula as it stands, **fit** allows one least-squares
scale per cell (the squared correlation), **first_order** is the JVP. Then the sign flips of the measured shift
against each prediction, the single-position sign prediction of the paper's section 6.2, and the top-K selectivity of
its section 3.7.
'''),
    code('''
summary = summarize_audit(result.records, result.sign_trials, result.selectivity)
print(format_audit_summary(summary))
'''),
    md('''
On this tiny model the paper's formula predicts little, while the first-order shift is close at small
$\\varepsilon$ and drifts as $\\varepsilon$ grows (the model is not linear in the state at those sizes). The
difference between the two is everything the formula leaves out: the gated norm and gate of the head's output, the
final norm, and every later layer. The docs (`docs/closed_form.md`) give the numbers on the shipped models.

## Figures
'''),
    code('''
for path in (plot_measured_vs_predicted(result.records, OUT / "04_measured_vs_predicted.png"),
             plot_r2_by_rank(summary, OUT / "04_r2_by_rank.png"),
             plot_r2_by_horizon(summary, OUT / "04_r2_by_horizon.png")):
    display(Image(filename=str(path)))
'''),
    md('''
The same audit from the command line, writing records (parquet), per-cell $R^2$, the sign trials, the selectivity,
a summary and these plots to a folder:

```bash
writesae closed-form --model qwen35-tiny --sae path/to/sae --layer 1 --head 0 --out runs/closed-form
```
'''),
]
