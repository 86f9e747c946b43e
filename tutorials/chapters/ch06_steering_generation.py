"""Notebook 06: cache edits that steer generation (padding, the batched engine, the install, erasure, amplification)."""

from cells import PICK_HEAD, code, md, setup_cell

NOTEBOOK = "06_steering_generation.ipynb"

CELLS = [
    md(r'''
# 6. Cache edits that steer generation

The paper's last experiments edit one head's cached state while the model generates (section 6 of the method):

1. **Three-position install.** Add $m\,\|\beta_s k_s v_s^\top\|_F\,(k_s/\|k_s\|)\,v_T^{*\top}$ to the state at three
   consecutive positions, with $v_T^* = W_O[h]^\top W_U[T] / \|\cdot\|$ the value-side direction that raises token
   $T$'s logit through the head, and count how often greedy decoding then emits $T$.
2. **Single-atom erasure.** Find the token an atom promotes (on half of its firings), remove the write or the atom at
   its other firings, and write the atom where it is silent.
3. **Amplification.** Push a layer's sentence-boundary features at every decoding step and measure the sampled text.

All three run on one engine, `writesae_lens.generation.generate_rows`: prompts x conditions x targets are rows of
one batched decode, each row with its own edits (`CacheEdit`), pushes (`Push`) and seed. Prompts of different
lengths are left-padded, and padding contributes nothing. Everything here runs on the tiny model shipped with the
package, with small SAEs trained in seconds: the numbers show the mechanics, not the paper's results.
'''),
    code(setup_cell('''
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Image, display

from writesae_lens import pipeline
from writesae_lens.evaluation.firings import head_states
from writesae_lens.generation import CacheEdit, generate_rows, target_directions
from writesae_lens.generation.amplification import (AmplificationSettings, amplification_probe,
                                                    format_amplification_summary)
from writesae_lens.generation.erasure import ErasureSettings, erasure_probe, format_erasure_summary
from writesae_lens.generation.install import (InstallSettings, format_install_summary, install_trials,
                                              plot_inclusion, summarize_install)
from writesae_lens.generation.targets import frequent_tokens, paper_target_classes, word_tokens
from writesae_lens.models import load_hooked_model
''')),
    md('''
## Prompts of different lengths

`forward` and `generate` take an `attention_mask` (1 = token, 0 = pad) for left-padded rows. At a pad the recurrent
layers write nothing and keep their state (zero write strength, zero log decay), the convolutions and token shifts see
zeros, and attention masks the pad's key. So each row generates what its prompt generates alone.
'''),
    code('''
model = load_hooked_model("qwen35-tiny")
texts = ["The old man walked to the river", "She said"]
tokens, mask = model.to_tokens_and_mask(texts)
print(tokens.shape, "mask:", mask.tolist())
padded = model.generate(tokens, attention_mask=mask, max_new_tokens=12, do_sample=False, stop_at_eos=False,
                        verbose=False)
for row, text in enumerate(texts):
    prompt = model.to_tokens(text)
    alone = model.generate(prompt, max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False)
    same = padded[row, tokens.shape[1]:].tolist() == alone[0, prompt.shape[1]:].tolist()
    print(f"padded row == alone: {same}  |", repr(model.to_string(alone[0])))
'''),
    md('''
## One install, by hand

The head with the longest memory in layer 1 (the rule of notebook 01). A target token, its direction $v_T^*$, and
three `CacheEdit`s at the positions before the prompt's last token (`relative=True`: the scale is m times the native
write's norm; no key given: the unit write key).
'''),
    code(PICK_HEAD + '''
train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
passages = pipeline.token_passages(model, eval_docs, 16, 64)
LAYER = 1
HEAD = int(head_memory(model, passages[:4]).loc[LAYER].to_numpy().argmax())
print(f"layer {LAYER}, head {HEAD}")

prompt = passages[0, :24]
target = model.to_tokens(" river", prepend_bos=False)[0, 0]
direction, norm = target_directions(model, LAYER, HEAD, target[None])
edits = [CacheEdit(row=0, position=s, layer=LAYER, head=HEAD, value=direction[0], scale=40.0, relative=True)
         for s in (20, 21, 22)]
native = generate_rows(model, [prompt], max_new_tokens=12, watch=target[None, None])
edited = generate_rows(model, [prompt], max_new_tokens=12, edits=edits, watch=target[None, None])
print("native:", repr(model.to_string(native.tokens[0])))
print("edited:", repr(model.to_string(edited.tokens[0])))
print(f"log p(' river') at the first generated token: native {native.watch_logp[0, 0, 0]:.3f}, "
      f"edited {edited.watch_logp[0, 0, 0]:.3f}")

# the same row inside a batch with other prompts gives the same tokens
rows = [passages[i, :24 - i] for i in range(1, 4)] + [prompt]
batched = generate_rows(model, rows, max_new_tokens=12, edits=[CacheEdit(**{**e.__dict__, "row": 3}) for e in edits])
print("batched row == alone:", batched.tokens[3].tolist() == edited.tokens[0].tolist())
'''),
    md('''
## The install protocol

`install_trials` draws targets per class by their rank at the first generated step (the paper's windows are for a
248k vocabulary; the shipped model has 4,096 tokens, so the rare and out-of-context windows are lowered), installs
each at every window and magnitude, and adds the native continuation and a matched-norm random direction. The summary
gives inclusion with Wilson intervals and exact McNemar tests; the plot, inclusion against m.
'''),
    code('''
classes = paper_target_classes(frequent_tokens(model, train_docs[:300]), word_tokens(model), rare=2000,
                               out_of_context=1000)
settings = InstallSettings(multipliers=(1.5, 3.0, 6.0, 40.0), n_windows=2, max_new_tokens=12)
records = install_trials(model, LAYER, HEAD, list(passages[:8, :24]), classes, settings)
summary = summarize_install(records)
print(f"{len(records)} trials")
print(format_install_summary(summary))
plot_inclusion(summary, OUT / "06_inclusion.png")
display(Image(OUT / "06_inclusion.png"))
'''),
    md('''
## Single-atom erasure

A small WriteSAE on the head (seconds), then the probe on its most frequent feature: the preferred token from half
of the firings, the erasure on the other half, and writes of $m\\,a^*A_i$ where the feature is silent.
'''),
    code('''
def small_sae(head):
    settings = pipeline.TrainSettings(layer=LAYER, head=head, d_sae=64, k=8, context_size=64,
                                      training_tokens=64 * 8 * 40, batch_tokens=512, lr=3e-3, warmup_steps=5)
    return pipeline.train_state_sae(model, train_docs, settings, OUT / f"sae_head{head}")

sae = small_sae(HEAD)
codes = sae.encode(head_states(model, passages[:4], LAYER, HEAD)[0])
feature = int((codes > 0).flatten(0, 1).sum(0).argmax())
result = erasure_probe(model, sae, LAYER, HEAD, feature, passages,
                       ErasureSettings(n_eval=30, n_nonfiring=30, n_dose=10, n_resamples=2000))
print(format_erasure_summary(result, model.to_string([result.preferred_token])))
'''),
    md('''
## Amplification

One SAE per head (two heads here, to stay quick; the paper pushes all heads of the layer), the top boundary features
of each, pushed at every decoding step at doses 2x, 5x and 10x, and a random-feature control; sampled continuations
seeded per prompt x condition, compared with the baseline by paired t-tests.
'''),
    code('''
other = (HEAD + 1) % model.cfg.n_heads
saes = {HEAD: sae, other: small_sae(other)}
period = model.to_tokens(".", prepend_bos=False)[0, 0].item()
amp = amplification_probe(model, saes, LAYER, list(passages[8:16, :16]), passages, period,
                          AmplificationSettings(n_top=5, max_new_tokens=48, n_resamples=2000))
print(amp.features.head(6).to_string(index=False))
print(format_amplification_summary(amp.summary, amp.floor))
'''),
    md('''
## From the command line

```bash
writesae install --model qwen35-tiny --layer 1 --head 0 --rare-rank 2000 --out-of-context-rank 1000 --out runs/install
writesae steer erase --model qwen35-tiny --layer 1 --head 0 --sae runs/sae --feature 12 --out runs/erase
writesae steer amplify --model qwen35-tiny --layer 1 --heads 0 1 --sae runs/sae0 runs/sae1 --out runs/amplify
```

Each writes its records as CSV, `summary.txt` / `summary.json`, a plot and `settings.json` (see `docs/generation.md`).
'''),
]
