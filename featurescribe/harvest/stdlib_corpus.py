"""`builtin:stdlib`: the Python standard library installed on this machine as a corpus.

Modules are read in a fixed order (files shuffled with a fixed seed), a pool of 16 at a time in
turn, so any prefix mixes many modules. Each module gives its docstrings as English documents and
its top-level functions and classes as code documents (`module_parts`).

Parsing a module (`ast.parse`) is most of the cost of reading this corpus, and it holds the GIL
for the whole parse, which stalls the forward pass a harvest runs beside its reader. So each
module's documents are kept in the cache, `<cache>/corpus/stdlib-<python>-<stdlib folder>-v<N>/`,
one JSON file per module that records the source's size and modification time: a module that
changed is parsed again. An entry is written to a temporary file and renamed into place (two
processes reading the corpus at once cannot leave a half-written one), and a cache folder that
cannot be written is simply not used: the documents are the same either way.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

DOC_CAP = 2000  # characters per document at most (cut at a line end)
POOL = 16  # modules read in turn
CACHE_FORMAT = 1  # bump when module_parts changes what it returns
SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "encodings",
        "lib2to3", "turtledemo", "tkinter", "ensurepip", "venv", "__phello__", "pydoc_data"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = stdlib_root() if root is None else root
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith("."))
        files.extend(Path(dirpath) / n for n in sorted(names) if n.endswith(".py"))
    files.sort(key=lambda p: str(p.relative_to(root)))
    random.Random(0).shuffle(files)
    return files


def chunks(text: str, limit: int = DOC_CAP) -> Iterator[str]:
    """Split a long text into pieces of at most `limit` characters, cut at line ends."""
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        cut = cut if cut > limit // 2 else limit
        yield text[:cut]
        text = text[cut:].lstrip("\n")
    if text.strip():
        yield text


def module_parts(path: Path) -> tuple[list[str], list[str]]:
    """(docstring chunks, top-level code chunks) of a module. Only the strings outlive this call: the
    syntax tree (tens of times the source's size) is not held while the reader's pool of modules is read."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return [], []
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [tree]  # the module, its top-level definitions and their methods (no full tree walk)
    for node in tree.body:
        if isinstance(node, defs):
            nodes.append(node)
            if isinstance(node, ast.ClassDef):
                nodes.extend(sub for sub in node.body if isinstance(sub, defs))
    docs = []
    for node in nodes:
        d = ast.get_docstring(node)
        if d and len(d) > 40:
            docs.append(d)
    lines = source.splitlines(keepends=True)
    code = []
    for node in tree.body:
        if isinstance(node, defs):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            seg = "".join(lines[first - 1: node.end_lineno])
            if len(seg) > 80:
                code.extend(chunks(seg))
    return list(chunks("\n\n".join(docs))), code


class PartsCache:
    """`module_parts` of the modules under `root`, kept as files in `folder` (None: not kept)."""

    def __init__(self, root: Path, folder: Path | None):
        self.root, self.folder = root, folder

    def parts(self, path: Path) -> tuple[list[str], list[str]]:
        try:
            st = path.stat()
        except OSError:
            return [], []
        if self.folder is None:
            return module_parts(path)
        rel = str(path.relative_to(self.root))
        entry = self.folder / f"{hashlib.sha256(rel.encode()).hexdigest()[:20]}.json"
        stamp = {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        kept = _read_entry(entry, stamp)
        if kept is not None:
            return kept
        prose, code = module_parts(path)
        self._write(entry, dict(stamp, prose=prose, code=code))
        return prose, code

    def _write(self, entry: Path, data: dict) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, entry)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:  # a full disk or a read-only cache: the documents do not depend on it
            log.debug("stdlib corpus cache not written (%s): %s", entry, err)


def _read_entry(entry: Path, stamp: dict) -> tuple[list[str], list[str]] | None:
    """The entry's (prose, code) when it is there, whole, and made from the same source file."""
    try:
        with open(entry, encoding="utf-8") as f:
            data = json.load(f)
        if all(data.get(k) == v for k, v in stamp.items()):
            prose, code = data["prose"], data["code"]
            if isinstance(prose, list) and isinstance(code, list):
                return prose, code
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def cache_folder(root: Path) -> Path | None:
    """This Python's stdlib cache folder, created; None when it cannot be."""
    from featurescribe.harvest.models import cache_dir

    ver = ".".join(map(str, sys.version_info[:3]))
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    folder = cache_dir() / "corpus" / f"stdlib-py{ver}-{where}-v{CACHE_FORMAT}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.debug("stdlib corpus cache not used (%s): %s", folder, err)
        return None
    return folder


def module_documents(cache: PartsCache, path: Path) -> Iterator[str]:
    """One module's documents: its docstrings (English) alternating with its top-level code."""
    prose, code = cache.parts(path)
    for i in range(max(len(prose), len(code))):
        if i < len(prose):
            yield prose[i]
        if i < len(code):
            yield code[i]


def stdlib_documents(root: Path | None = None, cache_in: Path | None | bool = True,
                     pool: int = POOL) -> Iterator[tuple[str, bool]]:
    """(document, True) in the corpus's order. `cache_in`: the cache folder (True: this Python's;
    None or False: parse every module)."""
    root = stdlib_root() if root is None else root
    folder = cache_folder(root) if cache_in is True else (cache_in or None)
    cache = PartsCache(root, folder)
    files = iter(stdlib_files(root))
    active: list[Iterator[str]] = []
    while True:
        while len(active) < pool:
            nxt = next(files, None)
            if nxt is None:
                break
            active.append(module_documents(cache, nxt))
        if not active:
            return
        keep = []
        for it in active:
            doc = next(it, None)
            if doc is not None:
                yield doc, True
                keep.append(it)
        active = keep
