"""Target tokens for the install protocol, stratified by their rank under the unedited model (paper section 6.3).

A ``TargetClass`` is a rank window ``[min_rank, max_rank]`` (1 = the top token) at the first generated step, over the
whole vocabulary or over a candidate list (the "frequent" and "semantic" out-of-context classes). Per prompt and
class, ``pick_targets`` draws ``per_class`` tokens uniformly among those in the window (seeded per prompt and class),
leaving out special tokens and, for out-of-context classes, tokens of the prompt.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

# Concrete nouns for the "semantic" class (single tokens in most vocabularies, with a leading space).
SEMANTIC_WORDS = ("ocean", "music", "doctor", "garden", "winter", "river", "mountain", "bread", "horse", "silver",
                  "kitchen", "window", "forest", "engine", "letter", "island", "castle", "church", "flower", "market",
                  "school", "summer", "table", "village", "water", "money", "paper", "army", "king", "ship")


@dataclass(frozen=True)
class TargetClass:
    name: str
    min_rank: int
    max_rank: int | None = None  # inclusive; None: no upper bound
    candidates: tuple[int, ...] | None = None  # token ids; None: the whole vocabulary
    out_of_context: bool = False  # leave out tokens that occur in the prompt


def paper_target_classes(frequent: list[int], semantic: list[int], mid=(100, 1000), rare: int = 10_000,
                         out_of_context: int = 17_000) -> list[TargetClass]:
    """The paper's four strata: mid-rank 100-1000, rare >= 10,000, and the frequent and semantic out-of-context
    classes (candidates from lists, rank >= 17,000). Smaller vocabularies need smaller windows (pass them)."""
    return [
        TargetClass("mid", mid[0], mid[1]),
        TargetClass("rare", rare),
        TargetClass("frequent", out_of_context, None, tuple(frequent), True),
        TargetClass("semantic", out_of_context, None, tuple(semantic), True),
    ]


def check_classes(classes: list[TargetClass], d_vocab: int) -> None:
    if not classes:
        raise ValueError("no target classes given")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"target class names must be distinct, got {names}")
    for c in classes:
        if c.min_rank < 1 or c.min_rank > d_vocab or (c.max_rank is not None and c.max_rank < c.min_rank):
            raise ValueError(f"target class {c.name!r}: the rank window [{c.min_rank}, {c.max_rank}] does not fit a "
                             f"vocabulary of {d_vocab} tokens (ranks 1..{d_vocab}); pass a smaller window")
        if c.candidates is not None:
            bad = [t for t in c.candidates if not 0 <= t < d_vocab]
            if bad or not c.candidates:
                raise ValueError(f"target class {c.name!r}: candidate tokens {bad or '(none)'} lie outside the "
                                 f"vocabulary (valid ids 0..{d_vocab - 1})")


def ranks_from_logits(logits: Tensor) -> Tensor:
    """``1 + #(tokens with a larger logit)`` for every token: [n, d_vocab] -> [n, d_vocab] (long)."""
    sorted_desc = logits.sort(dim=-1, descending=True).values
    # the number of entries strictly larger than x in a descending row = len - #(entries <= x)
    larger = logits.shape[-1] - torch.searchsorted(sorted_desc.flip(-1).contiguous(), logits.contiguous(), right=True)
    return 1 + larger


def pick_targets(first_logits: Tensor, prompts: list[Tensor], classes: list[TargetClass], per_class: int, seed: int,
                 exclude: set[int] = frozenset()) -> pd.DataFrame:
    """Columns prompt, target_class, target, native_rank: up to ``per_class`` targets per prompt and class."""
    ranks = ranks_from_logits(first_logits.float()).cpu().numpy()  # [n_prompts, d_vocab]
    rows = []
    for p, prompt in enumerate(prompts):
        in_prompt = set(prompt.tolist())
        for c_index, c in enumerate(classes):
            pool = np.arange(ranks.shape[1]) if c.candidates is None else np.unique(np.asarray(c.candidates))
            r = ranks[p, pool]
            keep = (r >= c.min_rank) & ((r <= c.max_rank) if c.max_rank is not None else True)
            keep &= ~np.isin(pool, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
            if c.out_of_context:
                keep &= ~np.isin(pool, np.fromiter(in_prompt, dtype=np.int64, count=len(in_prompt)))
            eligible = pool[keep]
            rng = np.random.default_rng([seed, p, c_index])
            chosen = rng.choice(eligible, size=min(per_class, len(eligible)), replace=False) if len(eligible) else []
            rows += [dict(prompt=p, target_class=c.name, target=int(t), native_rank=int(ranks[p, t])) for t in chosen]
    return pd.DataFrame(rows, columns=["prompt", "target_class", "target", "native_rank"])


def frequent_tokens(model, documents: list[str], n: int = 200) -> list[int]:
    """The ``n`` most frequent token ids of the documents (special tokens left out)."""
    counts: Counter = Counter()
    for document in documents:
        counts.update(model.tokenizer.encode(document, add_special_tokens=False))
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    return [t for t, _ in counts.most_common() if t not in special][:n]


def word_tokens(model, words=SEMANTIC_WORDS) -> list[int]:
    """The ids of the words that are one token (with a leading space, else bare)."""
    ids = []
    for word in words:
        for form in (" " + word, word):
            encoded = model.tokenizer.encode(form, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
                break
    return sorted(set(ids))
