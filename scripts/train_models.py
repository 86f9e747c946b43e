"""Train the small shipped language models with the reference implementations in transformers (CPU, seeded).

Families:
- `qwen35`: a Qwen3.5-architecture hybrid (`Qwen3_5ForCausalLM`, model_type `qwen3_5_text`): Gated DeltaNet layers with full
  (gated) attention every fourth layer, linear-attention heads with d_k = d_v.
- `mamba2`: `Mamba2ForCausalLM` (chunk_size 64, the fast setting for tiny CPU configs).
- `rwkv7`: the library's own pure-torch `HookedRWKV7` (no fla needed), initialised and saved as an fla checkpoint by
  `scripts/rwkv7_training.py`.

Data: the corpus' train split (scripts/build_corpus.py), tokenized with the shipped tokenizer; documents joined by
`<|endoftext|>`. Each step takes `--batch` random contiguous blocks of `--ctx` + 1 tokens (seeded generator). AdamW with linear
warmup then cosine decay to 10% of the peak rate, gradient clipping 1.0, weight decay on matrices only. Held-out loss on fixed
held-out blocks every `--eval-every` steps. The model folder (save_pretrained + tokenizer + training_log.json) is rewritten at each
evaluation, so an interrupted run still leaves a loadable model (its log says finished: false), together with
`checkpoint.pt` (weights, optimizer moments, the batch generator's state, the step and the log), written atomically. `--resume`
continues such a run from its checkpoint with the arguments it was started with (the same batches, the same learning-rate
schedule); only `--threads`, `--device` and `--stop-at` may change. SIGTERM or Ctrl-C ends a run the same way after the
current step (model + checkpoint saved), so a run can be stopped at any time and resumed later. Runs write to `.cache/train/<family>-tiny/` by default (outside the package:
a model is copied into `writesae_lens/data/models/` by hand once it beats the shipped one, see MODEL_CARD.md).

Decay initialisation (`--decay-init`, Gated DeltaNet only). transformers initialises `dt_bias = 1` and `A ~ U(0.01, 16)`, so at
initialisation a head keeps `exp(-A softplus(1)) = exp(-1.31 A)` of its state per token: below 0.27 for every head with A > 1,
i.e. 94 % of heads forget within a token or two, and short training contexts give no reason to learn otherwise (the models of
the first release kept that regime). `reference` draws the per-token step `dt` log-uniformly in [1e-3, 1e-1] and sets `dt_bias`
to its inverse softplus, as the reference Gated DeltaNet and Mamba-2 implementations do; with A ~ U(0.01, 16) the initial
per-token decays `exp(-A dt)` then spread from about 0.2 to 1 (median about 0.92: tens of tokens). Mamba-2 already gets this
initialisation from transformers.

    python scripts/train_models.py --family qwen35 --steps 3 --ctx 1024 --batch 8 --measure   # time a few steps, write nothing
    OMP_NUM_THREADS=1 nice -n 19 python scripts/train_models.py --family qwen35 --steps N --ctx 1024 --batch 8
    OMP_NUM_THREADS=1 nice -n 19 python scripts/train_models.py --family qwen35 --resume    # continue .cache/train/qwen35-tiny
"""

from __future__ import annotations

import argparse
import hashlib
import os
import json
import math
import platform
import random
import signal
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / ".cache" / "corpus"
TOKENIZER = REPO / "writesae_lens" / "data" / "tokenizer"
MODELS = REPO / "writesae_lens" / "data" / "models"
TRAIN_DIR = REPO / ".cache" / "train"
FOLDERS = {"qwen35": "qwen35-tiny", "mamba2": "mamba2-tiny", "rwkv7": "rwkv7-tiny"}


def make_config(family: str, vocab_size: int, bos: int, eos: int, pad: int):
    """A transformers config (qwen35, mamba2) or an fla-style config mapping (rwkv7)."""
    import transformers

    if family == "rwkv7":
        from rwkv7_training import rwkv7_config

        return rwkv7_config(vocab_size, bos, eos, pad)

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)
    if family == "qwen35":
        return transformers.Qwen3_5TextConfig(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            # full attention: 4 query heads, 2 kv heads of 32 (partial rotary 0.25 -> 8 rotary dims)
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            # Gated DeltaNet: 4 key heads and 4 value heads, d_k = d_v = 32
            linear_num_key_heads=4,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_conv_kernel_dim=4,
            max_position_embeddings=4096,
            initializer_range=0.02,
            **common,
        )
    if family == "mamba2":
        return transformers.Mamba2Config(
            hidden_size=128,
            num_hidden_layers=8,  # no MLPs in Mamba-2 blocks: 8 mixer layers give about the hybrid's parameter count
            expand=2,
            num_heads=8,  # num_heads * head_dim = expand * hidden_size
            head_dim=32,
            state_size=32,
            n_groups=1,
            conv_kernel=4,
            chunk_size=64,
            time_step_rank=8,
            initializer_range=0.02,
            **common,
        )
    raise SystemExit(f"unknown family {family!r}; choose from {sorted(FOLDERS)}")


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """[batch, pos] -> [batch, pos, vocab] for a transformers model or a hooked one (rwkv7)."""
    if hasattr(model, "cfg") and hasattr(model, "hook_dict"):
        return model(ids)
    return model(input_ids=ids, use_cache=False).logits


def reference_decay_init(model, generator: torch.Generator, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
    """Set every Gated DeltaNet layer's `dt_bias` to the inverse softplus of a log-uniform step in [dt_min, dt_max] and redraw
    `A ~ U(0.01, 16)` (seeded by `generator`), so that the initial per-token decay exp(-A softplus(dt_bias)) = exp(-A dt)."""
    layers = [m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "dt_bias")]
    if not layers:
        raise SystemExit("--decay-init reference: the model has no layer with A_log and dt_bias")
    with torch.no_grad():
        for layer in layers:
            n = layer.dt_bias.numel()
            log_dt = torch.rand(n, generator=generator) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = log_dt.exp()  # [head]
            layer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
            layer.A_log.copy_((torch.rand(n, generator=generator) * (16 - 0.01) + 0.01).log())


def save_checkpoint(path: Path, model, opt, gen: torch.Generator, step: int, log: dict) -> None:
    """Everything a resumed run needs, written to a temporary file first so that a kill never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step}
    torch.save(state | {"log": log}, tmp)
    os.replace(tmp, path)


def load_tokens(split: str, tokenizer) -> torch.Tensor:
    """The split's token ids as one int32 stream starting with <|endoftext|>, cached next to the split by its sha256."""
    text_path = CORPUS / f"{split}.txt"
    if not text_path.exists():
        raise SystemExit(f"{text_path} is missing: run scripts/build_corpus.py first")
    raw = text_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    tok_digest = hashlib.sha256((TOKENIZER / "tokenizer.json").read_bytes()).hexdigest()
    cache = CORPUS / f"{split}.{digest[:12]}.{tok_digest[:12]}.tokens.pt"
    if cache.exists():
        return torch.load(cache)
    ids: list[int] = [tokenizer.eos_token_id]
    text = raw.decode("utf-8")
    for doc in text.split("<|endoftext|>"):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    tokens = torch.tensor(ids, dtype=torch.int32)
    torch.save(tokens, cache)
    return tokens


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch].long()
        logits = logits_of(model, x[:, :-1])  # [batch, ctx, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + x[:, 1:].numel()
    model.train()
    return total / count


def save(model, tokenizer, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if log["family"] == "rwkv7":
        from rwkv7_training import save_rwkv7

        save_rwkv7(model, log["config"], out)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # A tokenizer loaded from a folder records how it was loaded; that is no property of the saved tokenizer.
    cfg_path = out / "tokenizer_config.json"
    cfg = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k not in ("is_local", "local_files_only")}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(FOLDERS))
    parser.add_argument("--steps", type=int, default=None, help="total steps (required unless --resume)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--eval-every", type=int, default=250, help="held-out loss, model and checkpoint every N steps")
    parser.add_argument("--log-every", type=int, default=50, help="print the mean training loss every N steps")
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument(
        "--decay-init", choices=["transformers", "reference"], default="reference",
        help="Gated DeltaNet dt_bias / A_log initialisation (see the module docstring); ignored for mamba2",
    )
    parser.add_argument("--out", type=Path, default=None, help="default .cache/train/<family>-tiny")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save a checkpoint and exit after this step (the schedule still runs to --steps; "
                        "continue with --resume)")
    parser.add_argument("--measure", action="store_true", help="time --steps steps and exit without saving")
    args = parser.parse_args(argv)
    out = args.out or TRAIN_DIR / FOLDERS[args.family]
    resumed = None
    if args.resume:
        ckpt_path = out / "checkpoint.pt"
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        resumed = torch.load(ckpt_path, weights_only=False)
        saved = resumed["log"]["args"]
        keep = {"threads": args.threads, "device": args.device, "stop_at": args.stop_at}
        args = argparse.Namespace(**{"log_every": 50, **saved, **keep, "out": out, "resume": True, "measure": False})
        print(f"resuming {out} at step {resumed['step']}/{args.steps}", flush=True)
    elif args.steps is None:
        parser.error("--steps is required unless --resume")
    elif not args.measure and (out / "checkpoint.pt").exists():
        raise SystemExit(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it or choose another --out")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = make_config(args.family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if args.family == "rwkv7":
        from rwkv7_training import build_rwkv7

        model = build_rwkv7(config, tokenizer, torch.Generator().manual_seed(args.seed))
    else:
        model = AutoModelForCausalLM.from_config(config)
    if args.family == "qwen35" and args.decay_init == "reference":
        reference_decay_init(model, torch.Generator().manual_seed(args.seed + 1))
    model = model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.family}: {type(model).__name__}, {n_params:,} parameters", flush=True)

    train_tokens = load_tokens("train", tokenizer)
    held_tokens = load_tokens("heldout", tokenizer)
    # Fixed held-out blocks: evenly spaced, non-overlapping.
    span = args.ctx + 1
    n_held = min(args.eval_blocks, len(held_tokens) // span)
    stride = len(held_tokens) // n_held
    held_blocks = torch.stack([held_tokens[i * stride : i * stride + span] for i in range(n_held)]).to(args.device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    log = {
        "family": args.family,
        "model_class": type(model).__name__,
        "parameters": n_params,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": config if isinstance(config, dict) else config.to_dict(),
        "data": {
            "train_sha256": hashlib.sha256((CORPUS / "train.txt").read_bytes()).hexdigest(),
            "heldout_sha256": hashlib.sha256((CORPUS / "heldout.txt").read_bytes()).hexdigest(),
            "tokenizer_sha256": hashlib.sha256((TOKENIZER / "tokenizer.json").read_bytes()).hexdigest(),
            "train_tokens": len(train_tokens),
            "heldout_tokens": len(held_tokens),
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "threads": args.threads,
        },
        "train_loss": [],  # [step, mean loss over the last interval]
        "heldout_loss": [],  # [step, loss]
        "finished": False,
    }
    first_step, seconds_before = 0, 0.0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        gen.set_state(resumed["generator"])
        first_step = resumed["step"]
        log = resumed["log"]
        log.setdefault("resumed_at", []).append(first_step)
        seconds_before = log.get("train_seconds", 0.0)
    model.train()
    start = time.time()
    running, n_running = 0.0, 0
    stop_requested: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if not args.measure:  # SIGTERM / SIGINT: finish the step, save the model and a checkpoint, exit
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
    try:
        for step in range(first_step, args.steps):
            starts = torch.randint(0, len(train_tokens) - span, (args.batch,), generator=gen)
            x = torch.stack([train_tokens[s : s + span] for s in starts.tolist()]).long().to(args.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            logits = logits_of(model, x[:, :-1])  # [batch, ctx, vocab]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running, n_running = running + loss.item(), n_running + 1
            if args.measure:
                print(f"step {step}: loss {loss.item():.3f}, {time.time() - start:.1f} s elapsed", flush=True)
                continue
            last = step + 1 == args.steps
            pause = (args.stop_at is not None and step + 1 == args.stop_at) or bool(stop_requested)
            if (step + 1) % args.log_every == 0 or last:
                elapsed = time.time() - start
                per_step = elapsed / (step + 1 - first_step)
                log["train_loss"].append([step + 1, round(running / n_running, 4)])
                print(
                    f"step {step + 1}/{args.steps} loss {running / n_running:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"{per_step:.2f} s/step, eta {per_step * (args.steps - step - 1) / 60:.1f} min",
                    flush=True,
                )
                running, n_running = 0.0, 0
            evaluate = (step + 1) % args.eval_every == 0 or last or (pause and not stop_requested)
            if evaluate or stop_requested:  # on a signal: save at once, without the held-out pass
                if evaluate:
                    held = heldout_loss(model, held_blocks, args.batch)
                    log["heldout_loss"].append([step + 1, round(held, 4)])
                    print(f"  heldout loss {held:.3f} (ppl {math.exp(held):.1f})", flush=True)
                log["steps_done"] = step + 1
                log["train_seconds"] = round(seconds_before + time.time() - start, 1)
                log["finished"] = last
                save(model, tokenizer, out, log)
                save_checkpoint(out / "checkpoint.pt", model, opt, gen, step + 1, log)
                print(f"  saved {out} at step {step + 1}", flush=True)
            if pause:
                why = f"signal {stop_requested[0]}" if stop_requested else "--stop-at"
                print(f"stopped at step {step + 1} ({why}); continue with --resume --out {out}", flush=True)
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.measure:
        print(f"{(time.time() - start) / args.steps:.2f} s/step with {args.threads} thread(s)")


if __name__ == "__main__":
    main()
