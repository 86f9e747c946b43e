"""Train the project's byte-level BPE tokenizer (vocab 4096) on the corpus' train split.

`<|endoftext|>` (id 0) is BOS, EOS and the document separator; `<|pad|>` (id 1) pads. The result is saved with
`PreTrainedTokenizerFast.save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(folder)` loads it offline as a fast
tokenizer. Byte-level: every string round-trips exactly, no unknown token. Deterministic for a given train split.

    python scripts/build_corpus.py
    python scripts/train_tokenizer.py   # writes writesae_lens/data/tokenizer/
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
EOT, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 4096


def iter_documents(path: Path, chunk_chars: int = 100_000):
    """Documents of a split file, long ones in pieces (the trainer only needs word counts)."""
    for doc in path.read_text(encoding="utf-8").split(EOT):
        for i in range(0, len(doc), chunk_chars):
            yield doc[i : i + chunk_chars]


def train(train_txt: Path, out: Path, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(train_txt), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    meta = {
        "vocab_size": len(fast),
        "train_split_sha256": hashlib.sha256(train_txt.read_bytes()).hexdigest(),
        "special_tokens": {EOT: fast.convert_tokens_to_ids(EOT), PAD: fast.convert_tokens_to_ids(PAD)},
        "recipe": "tokenizers BPE, ByteLevel(add_prefix_space=False) pre-tokenizer and decoder, min_frequency=2",
    }
    (out / "training_info.json").write_text(json.dumps(meta, indent=1) + "\n")
    return fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=REPO / ".cache" / "corpus" / "train.txt")
    parser.add_argument("--out", type=Path, default=REPO / "writesae_lens" / "data" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    if not args.train.exists():
        raise SystemExit(f"{args.train} is missing: run scripts/build_corpus.py first")
    fast = train(args.train, args.out, args.vocab_size)
    sample = "The Constitution of the United States, said Mr. Darcy—“in the beginning”—1961."
    ids = fast.encode(sample)
    assert fast.decode(ids) == sample, (fast.decode(ids), sample)
    print(f"saved {args.out}: vocab {len(fast)}, {len(ids)} tokens for {len(sample)} chars of a sample")


if __name__ == "__main__":
    main()
