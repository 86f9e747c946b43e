"""Data shipped with writesae-lens: a held-out English evaluation text, the project's tokenizer and two tiny trained models.

Everything here was built offline from registry packages by the scripts in `scripts/` (see `models/MODEL_CARD.md`):

- `heldout_eval.txt`: the held-out split of the project corpus (State of the Union addresses, the Brown corpus, Jane Austen's
  novels, the World English Bible; no training step saw it). Documents are separated by `<|endoftext|>`.
- `tokenizer/`: a byte-level BPE with 4096 entries; `<|endoftext|>` is BOS/EOS. Load with `AutoTokenizer.from_pretrained`.
- `models/qwen35-tiny/`: a Qwen3.5-architecture hybrid (Gated DeltaNet + gated full attention), `Qwen3_5ForCausalLM`.
- `models/mamba2-tiny/`: a Mamba-2 model, `Mamba2ForCausalLM`.

The functions return paths inside the installed package and need no network:

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from writesae_lens.data import pretrained_path, tokenizer_path
    >>> model = AutoModelForCausalLM.from_pretrained(pretrained_path("qwen35-tiny"))
    >>> tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DATA_DIR",
    "EOT",
    "PRETRAINED_MODELS",
    "heldout_text_path",
    "load_heldout_documents",
    "load_heldout_text",
    "pretrained_path",
    "tokenizer_path",
]

DATA_DIR = Path(__file__).resolve().parent
EOT = "<|endoftext|>"

# name -> (folder under data/models, one-line description)
PRETRAINED_MODELS: dict[str, str] = {
    "qwen35-tiny": "Qwen3.5-architecture hybrid: 3 Gated DeltaNet layers + 1 gated full-attention layer, d_model 128",
    "mamba2-tiny": "Mamba-2: 8 layers, d_model 128, 8 heads of 32, state size 32",
    "rwkv7-tiny": "RWKV-7: 4 layers, d_model 128, 4 heads of 32 x 32 (fla's checkpoint format)",
}


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} is missing at {path}. It is built by the scripts in the repository's scripts/ folder "
            "(see writesae_lens/data/models/MODEL_CARD.md); an installation without package data lacks it."
        )
    return path


def heldout_text_path() -> Path:
    """Path of the shipped held-out evaluation text (UTF-8, documents separated by `<|endoftext|>`)."""
    return _existing(DATA_DIR / "heldout_eval.txt", "the held-out evaluation text")


def load_heldout_text() -> str:
    """The shipped held-out evaluation text as one string."""
    return heldout_text_path().read_text(encoding="utf-8")


def load_heldout_documents() -> list[str]:
    """The shipped held-out evaluation text split into its documents."""
    return [doc for doc in load_heldout_text().split(EOT) if doc.strip()]


def tokenizer_path() -> Path:
    """Folder of the project's byte-level BPE tokenizer (for `transformers.AutoTokenizer.from_pretrained`)."""
    return _existing(DATA_DIR / "tokenizer", "the shipped tokenizer")


def pretrained_path(name: str) -> Path:
    """Folder of a shipped tiny model: for `writesae_lens.models.load_hooked_model` (every one), and for
    `transformers.AutoModelForCausalLM.from_pretrained` (qwen35-tiny and mamba2-tiny; rwkv7-tiny is in fla's format,
    which transformers does not know).

    Valid names: the keys of `PRETRAINED_MODELS` ("qwen35-tiny", "mamba2-tiny", "rwkv7-tiny").
    """
    if name not in PRETRAINED_MODELS:
        valid = ", ".join(repr(n) for n in PRETRAINED_MODELS)
        raise KeyError(f"unknown shipped model {name!r}; valid names: {valid}")
    return _existing(DATA_DIR / "models" / name, f"the shipped model {name!r}")
