"""Notebook 07: SAEs spliced into the model (add_sae in both meanings, SAELens' cache names, the error term, feature
ablation through it, the refusal of an SAE as a plain hook)."""

from cells import PICK_HEAD, code, md, setup_cell

NOTEBOOK = "07_splicing_saes.ipynb"

CELLS = [
    md(r'''
# 7. SAEs spliced into the model

SAELens' `HookedSAETransformer` lets an SAE sit inside the forward pass: `add_sae`, `run_with_saes`,
`run_with_cache_with_saes`, a `saes()` context, `use_error_term`, and the SAE's activations in the cache. The hooked
models here do the same (`writesae_lens.splicing`, docs/splicing.md). A recurrent state adds one choice SAELens never
faces, the **meaning** of a state SAE:

- `mode="read"` (default): the head *reads* the reconstruction $R(S_t)$ at every position, while the recurrence keeps
  the native states (a read-only edit).
- `mode="state"`: the reconstruction *becomes* the state the recurrence continues from, the closed loop
  $S'_t = R(\mathrm{transition}_t(S'_{t-1}) + \mathrm{write}_t)$.

This notebook trains a small WriteSAE on one head of the tiny model shipped with the package, splices it both ways,
checks the error-term identity, ablates a feature through the error term, and shows what is refused.
'''),
    code(setup_cell('''
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

from writesae_lens import pipeline
from writesae_lens.models import load_hooked_model
''')),
    md('''
## A model that takes SAEs, and one small WriteSAE

Every hooked family class has the splicing methods (`HookedSAEMixin` is among its bases), so a loaded model takes
SAEs as it is. The WriteSAE is trained with SAELens' runner as in notebook 05, on the head with the
longest memory; its metadata records where it belongs (`hook_name`, `hook_head_index`), which is what `add_sae` reads.
'''),
    code('''
model = load_hooked_model("qwen35-tiny")
print(type(model).__name__, "has add_sae:", hasattr(model, "add_sae"))
train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
tokens = pipeline.token_passages(model, eval_docs, 4, 64)  # [4, 64]
''' + PICK_HEAD + '''
memory = head_memory(model, tokens)
LAYER = int(memory.max(axis=1).idxmax())
HEAD = int(memory.loc[LAYER].to_numpy().argmax())
settings = pipeline.TrainSettings(layer=LAYER, head=HEAD, d_sae=64, k=4, context_size=64, training_tokens=64 * 8 * 30,
                                  batch_tokens=512, lr=3e-3, warmup_steps=5, seed=0)
sae = pipeline.train_state_sae(model, train_docs, settings, OUT / "07_writesae")
torch.set_grad_enabled(False)  # training is done
print("hook_name:", sae.cfg.metadata.hook_name, "| hook_head_index:", sae.cfg.metadata.hook_head_index)
'''),
    md('''
The comparisons below are identities that hold up to rounding, so the rest of the notebook runs in float64, where
rounding is far below the differences that matter (in float32 the same checks agree to about 1e-6 of the logits'
scale).
'''),
    code('''
model.to(torch.float64)
sae.to(dtype=torch.float64)
clean_logits = model(tokens)  # no SAE spliced yet
print(model.cfg.dtype, sae.dtype)
'''),
    md('''
## `add_sae` and the cache

`add_sae` keeps the SAE until `reset_saes()`. A head-indexed SAE puts the head in its name,
`blocks.{l}.mixer.hook_state.head{h}`, and its hook points are SAELens' six: `hook_sae_input`, `hook_sae_acts_pre`,
`hook_sae_acts_post`, `hook_sae_recons`, `hook_sae_error` (with the error term) and `hook_sae_output`. They are in
`model.hook_dict` while the SAE is attached, so `run_with_cache` records them and `run_with_hooks` accepts them.
'''),
    code('''
model.add_sae(sae)  # mode="read"
print("spliced:", list(model.acts_to_saes))
logits, cache = model.run_with_cache(tokens)
SPLICE = f"blocks.{LAYER}.mixer.hook_state.head{HEAD}"
for name in cache:
    if name.startswith(SPLICE):
        print(f"{name:58s} {tuple(cache[name].shape)}")
acts = cache[f"{SPLICE}.hook_sae_acts_post"]  # [batch, pos, d_sae]
print(f"L0 = {(acts > 0).sum(-1).double().mean().item():.2f} active features per position (k = {sae.cfg.k})")
state_name = f"blocks.{LAYER}.mixer.hook_state"
print("the model's own hook_state is left as it is in mode='read':",
      torch.equal(cache[state_name][:, :, HEAD], cache[f"{SPLICE}.hook_sae_input"]))
model.reset_saes()
'''),
    md('''
## The two meanings

Without the error term the SAE's reconstruction error reaches the outputs. In `"read"` only the head's reads see it;
in `"state"` it also compounds through the recurrence (the loop is stepped one position at a time with the cache, then
replayed once so that every hook fires on whole tensors). `run_with_saes` splices for one call.
'''),
    code('''
def next_token_loss(logits):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


print(f"loss without SAE        {next_token_loss(clean_logits):.4f}")
for mode in ("read", "state"):
    spliced = model.run_with_saes(tokens, saes=[sae], use_error_term=False, mode=mode)
    print(f"loss, mode={mode!r:8s}  {next_token_loss(spliced):.4f}   "
          f"max |logit change| {(spliced - clean_logits).abs().max().item():.3f}")
'''),
    md('''
## The error term

With `use_error_term=True` the splice outputs `reconstruction + (input - clean reconstruction)`, the clean one computed
with the SAE's hooks switched off, as in SAELens. Without an intervention that is the input itself, so the model's
outputs equal those without the SAE, in both meanings.
'''),
    code('''
for mode in ("read", "state"):
    spliced = model.run_with_saes(tokens, saes=[sae], use_error_term=True, mode=mode)
    print(f"error term on, mode={mode!r}: max |difference| = {(spliced - clean_logits).abs().max().item():.2e}")
'''),
    md(r'''
## Ablating a feature through the error term

A hook on `hook_sae_acts_post` that zeroes feature $j$ changes the reconstruction by exactly $-a_j A_j$ (the decoder
is linear), and the error term keeps everything the SAE does not explain. So the head's state as the model uses it
(`hook_sae_output`) is the native state minus feature $j$'s atom, nothing else, and the outputs change only through it.
'''),
    code('''
active_positions = (acts > 0).sum(dim=(0, 1))
FEATURE = int(active_positions.argmax())
print(f"feature {FEATURE} fires at {int(active_positions[FEATURE])} of {acts.shape[0] * acts.shape[1]} positions")


def ablate(acts_post, hook):
    acts_post = acts_post.clone()
    acts_post[..., FEATURE] = 0.0
    return acts_post


with model.saes([sae], use_error_term=True):  # the splice's hook points exist inside the block
    with model.hooks(fwd_hooks=[(f"{SPLICE}.hook_sae_acts_post", ablate)]):
        ablated_logits, ablated = model.run_with_cache(tokens)
a_j = acts[..., FEATURE]  # [batch, pos], before the ablation
atom = sae.W_dec[FEATURE]  # the atom A_j, flattened [d_k * d_v]
change = ablated[f"{SPLICE}.hook_sae_output"] - ablated[f"{SPLICE}.hook_sae_input"]  # [batch, pos, d_k * d_v]
print(f"state change = -a_j A_j: max |error| = {(change + a_j[..., None] * atom).abs().max().item():.2e}")
print(f"loss without SAE {next_token_loss(clean_logits):.4f}, with feature {FEATURE} ablated "
      f"{next_token_loss(ablated_logits):.4f}")
'''),
    md('''
## What is refused

An SAE on `hook_state` holds one head's dictionary, and `hook_state` carries every head. Passed as a plain hook,
`(hook_state, sae)`, it would encode every head with that dictionary, so it is refused with the way to splice it
instead; so is an SAE on `hook_state` whose metadata names no head.
'''),
    code('''
try:
    model.run_with_hooks(tokens, fwd_hooks=[(state_name, sae)])
except ValueError as error:
    print("refused:", error)

sae.cfg.metadata.hook_head_index = None
try:
    model.add_sae(sae)
except ValueError as error:
    print("refused:", error)
sae.cfg.metadata.hook_head_index = HEAD
print("still spliced:", model.acts_to_saes)
'''),
    md('''
## Where next

- docs/splicing.md: the two meanings in detail (costs, which hooks act during the closed loop, gradients), the names,
  the lifecycle (`saes()` restores the splices on exit, `reset_hooks()` does not remove SAEs).
- The paper's released checkpoints splice as they are: `writesae_lens.saes.load_paper_checkpoint(path, model=model)`
  records `hook_name` and `hook_head_index`, and converts the Mamba-2 checkpoints (trained on transformers'
  `[head_dim, d_state]` cache, the transpose of `hook_state`); without `model=` the layout is decided from the
  checkpoint, or the import stops and asks for `state_layout`.
'''),
]
