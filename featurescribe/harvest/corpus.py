"""Corpus readers and the tokenizer-side of the harvest: text -> fixed-length token sequences.

A corpus SPEC is a `.txt` file, a folder of `.txt` files (recursively, sorted by path), a `.jsonl`
file (the string field `text` of each line), a `.parquet` file (the column `text`), or
`builtin:NAME`:

- `builtin:stdlib`: the Python standard library installed on this machine, read in a fixed order
  (files shuffled with a fixed seed): each module's docstrings as English documents alternating with
  its top-level functions and classes as code documents (harvest/stdlib_corpus.py, which keeps each
  parsed module in the cache).

Documents are tokenized without special tokens and joined into one stream with the tokenizer's EOS
token between documents. The stream is cut into sequences of `ctx` tokens; when the tokenizer adds a
BOS token by default (Gemma), every sequence starts with BOS followed by `ctx - 1` stream tokens.
Reading and tokenizing stream: memory does not grow with the corpus.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from featurescribe.errors import FeaturescribeError

_TEXT_PIECE = 1 << 20  # large .txt files are read in pieces of about 1 MiB (cut at line ends)
# Each .txt file's head is checked before a harvest: a NUL byte, or more than one byte in
# _MAX_BAD_BYTES that is not UTF-8, is a binary or otherwise-encoded file and is refused; fewer
# (stray bytes in text) are read as U+FFFD, as everywhere past the head.
_SNIFF_BYTES = 1 << 16
_MAX_BAD_BYTES = 1000
_JSONL_CHECK_BYTES = 64 << 20

BUILTIN_CORPORA = ("stdlib",)


@dataclass(frozen=True)
class Corpus:
    """A corpus to read: `spec` as given, `name` canonical, `fingerprint` of its content's identity."""

    spec: str
    name: str  # canonical: 'builtin:stdlib' or an absolute path
    kind: str  # 'builtin' | 'txt' | 'dir' | 'jsonl' | 'parquet'
    fingerprint: str

    def key(self, ctx: int) -> str:
        """What `sequences.corpus` records: the same key means the same sequences for a tokenizer."""
        return f"{self.name}|ctx={ctx}|{self.fingerprint}"

    def documents(self) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) pieces in a deterministic order."""
        if self.kind == "builtin":
            from featurescribe.harvest.stdlib_corpus import stdlib_documents

            return stdlib_documents()
        if self.kind == "txt":
            return _txt_pieces(Path(self.name))
        if self.kind == "dir":
            return _dir_pieces(Path(self.name))
        if self.kind == "jsonl":
            return _jsonl_documents(Path(self.name))
        if self.kind == "parquet":
            return _parquet_documents(Path(self.name))
        raise AssertionError(self.kind)


def _stat_fingerprint(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _txt_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*.txt") if p.is_file()), key=lambda p: str(p.relative_to(folder)))


def open_corpus(spec: str) -> Corpus:
    """Parse a corpus SPEC; a bad spec is an error here, before anything is read or written."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_CORPORA:
            raise FeaturescribeError(f"unknown builtin corpus {spec!r}: use one of "
                                     + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA))
        ver = ".".join(map(str, sys.version_info[:3]))
        return Corpus(spec, f"builtin:{name}", "builtin", f"py{ver}")
    p = Path(spec).expanduser()
    if not p.exists():
        raise FeaturescribeError(f"corpus {spec} does not exist (use a .txt file or folder, .jsonl, "
                                 "or .parquet file, or builtin:stdlib)")
    p = p.resolve()
    if p.is_dir():
        files = _txt_files(p)
        if not files:
            raise FeaturescribeError(f"corpus {spec} is empty: the folder has no .txt files")
        for f in files:
            _check_text_file(f, f"corpus {spec}: {f.relative_to(p)}")
        return Corpus(spec, str(p), "dir", _stat_fingerprint(files, p))
    suffix = p.suffix.lower()
    kind = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise FeaturescribeError(f"corpus {spec}: unknown file type {suffix or '(none)'}; "
                                 "use .txt, .jsonl (field text) or .parquet (column text)")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(p)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise FeaturescribeError(f"corpus {spec} is not a readable Parquet file: {err}") from None
        if "text" not in schema.names:
            raise FeaturescribeError(f"corpus {spec} has no column 'text' (columns: {', '.join(schema.names)})")
        if not _holds_strings(schema.field("text").type):
            raise FeaturescribeError(f"corpus {spec}: the column 'text' holds {schema.field('text').type}, "
                                     "not strings")
    if kind == "txt":
        _check_text_file(p, f"corpus {spec}")
    if kind == "jsonl":
        _check_jsonl_head(p)
    return Corpus(spec, str(p), kind, _stat_fingerprint([p], p))


def _check_jsonl_head(path: Path) -> None:
    """FeaturescribeError at the first bad line of the file's first _JSONL_CHECK_BYTES, before any
    work: that covers every harvest of up to millions of tokens, without reading a corpus of many
    gigabytes twice. A bad line past it stops the harvest when it is reached, in the same words."""
    read = 0
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if read > _JSONL_CHECK_BYTES:
                return
            read += len(line)
            if line.strip():
                _jsonl_text(_jsonl_object(line.strip(), path, n), path, n)


def _check_text_file(path: Path, name: str) -> None:
    """FeaturescribeError where the file's head is not UTF-8 text (see _SNIFF_BYTES)."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
        whole = not f.read(1)
    nul = head.find(b"\0")
    if nul >= 0:
        raise FeaturescribeError(f"{name} is not text: it has a NUL byte (at byte {nul:,}), as a binary file "
                                 "or UTF-16 text has; a corpus is UTF-8 text")
    try:
        head.decode("utf-8")
        return
    except UnicodeDecodeError as err:
        first = err.start
    decoded = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(head, final=whole)
    bad = sum(1 for ch in decoded if "\udc80" <= ch <= "\udcff")
    if bad * _MAX_BAD_BYTES > len(head):
        raise FeaturescribeError(f"{name} is not UTF-8 text: {bad:,} of its first {len(head):,} bytes are not "
                                 f"UTF-8 (the first at byte {first:,}); convert it to UTF-8 (e.g. iconv -f "
                                 "latin1 -t utf-8) or pass another file")


def _holds_strings(t) -> bool:
    """An Arrow type whose values read as str (plain, large, view, or dictionary-encoded strings)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"


# --- readers -------------------------------------------------------------------------------------

def _txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        carry = ""
        while True:
            block = f.read(_TEXT_PIECE)
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n")
            if cut < 0 or len(block) < _TEXT_PIECE:
                carry, text = "", text
            else:
                carry, text = text[cut + 1:], text[: cut + 1]
            if text:
                yield text, False
        if carry:
            yield carry, False
    yield "", True


def _dir_pieces(folder: Path) -> Iterator[tuple[str, bool]]:
    for f in _txt_files(folder):
        yield from _txt_pieces(f)


def _jsonl_documents(path: Path) -> Iterator[tuple[str, bool]]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            text = _jsonl_text(_jsonl_object(line, path, n), path, n)
            if text:
                yield text, True


def _jsonl_object(line: str, path: Path, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise FeaturescribeError(f"corpus {path}: line {n} is not JSON ({err.msg})") from None


def _jsonl_text(obj, path: Path, n: int) -> str | None:
    """Line `n`'s `text` (None where it is null, as a null in a Parquet corpus's column)."""
    if not isinstance(obj, dict):
        raise FeaturescribeError(f"corpus {path}: line {n} is a JSON {_json_type(obj)}, not an object "
                                 "with a field 'text'")
    if "text" not in obj:
        raise FeaturescribeError(f"corpus {path}: line {n} has no field 'text' (fields: {', '.join(obj) or 'none'})")
    text = obj["text"]
    if text is not None and not isinstance(text, str):
        raise FeaturescribeError(f"corpus {path}: line {n}'s field 'text' is a JSON {_json_type(text)}, "
                                 "not a string")
    return text


def _json_type(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(
        type(value), "object")


def _parquet_documents(path: Path) -> Iterator[tuple[str, bool]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield text, True


# --- tokenizing into sequences -------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A short id of a tokenizer's behaviour: the same id tokenizes the same text the same way."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{i}\0{tok}\n".encode())
    h.update(f"bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id}".encode())
    base = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer")).name or "tokenizer"
    return f"{base}:{h.hexdigest()[:12]}"


def adds_bos(tokenizer) -> bool:
    """Does the tokenizer put BOS in front of text by default (as Gemma's does)?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


@dataclass
class Sequence:
    corpus_index: int
    token_ids: np.ndarray  # int32, length <= ctx


def token_stream(corpus: Corpus, tokenizer, group_chars: int = 1 << 17) -> Iterator[np.ndarray]:
    """The corpus as one stream of token ids (arrays), EOS between documents.

    Texts are tokenized in groups (the fast tokenizer's batch call); the first groups are small so
    the first sequences come out at once, later ones grow to `group_chars` characters.
    """
    eos = tokenizer.eos_token_id
    sep = np.asarray([eos], dtype=np.int32) if eos is not None else None
    texts: list[str] = []
    ends: list[bool] = []
    size = 0

    pending = False  # tokens since the last separator: an empty document adds no separator

    def flush():
        nonlocal pending
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for ids, end in zip(enc, ends):
            if ids:
                pending = True
                yield np.asarray(ids, dtype=np.int32)
            if end and pending and sep is not None:
                pending = False
                yield sep

    limit = min(4096, group_chars)
    for text, end in corpus.documents():
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= limit:
            yield from flush()
            texts, ends, size = [], [], 0
            limit = min(2 * limit, group_chars)
    yield from flush()


def sequences(corpus: Corpus, tokenizer, ctx: int, max_tokens: int | None = None) -> Iterator[Sequence]:
    """Cut the token stream into sequences of `ctx` tokens (BOS first when the tokenizer uses one).

    Stops after the sequence that reaches `max_tokens` tokens in all; the last sequence of the corpus
    may be shorter. Sequence i is the same whatever `max_tokens` is.
    """
    if ctx < 2:
        raise FeaturescribeError("--ctx must be at least 2")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    body = ctx - len(bos)
    prefix = np.asarray(bos, dtype=np.int32)
    buf: list[np.ndarray] = []
    have = 0
    index = 0
    total = 0

    def take(n: int) -> np.ndarray:
        nonlocal buf, have
        joined = np.concatenate(buf) if len(buf) > 1 else buf[0]
        out, rest = joined[:n], joined[n:]
        buf = [rest] if len(rest) else []
        have = len(rest)
        return out

    for ids in token_stream(corpus, tokenizer):
        buf.append(ids)
        have += len(ids)
        while have >= body:
            seq = np.concatenate([prefix, take(body)])
            yield Sequence(index, seq)
            index += 1
            total += len(seq)
            if max_tokens is not None and total >= max_tokens:
                return
    if have:
        yield Sequence(index, np.concatenate([prefix, take(have)]))
