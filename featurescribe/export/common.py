"""What every writer shares: stable JSON text, reproducible gzip, all-or-nothing output, names."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from featurescribe.errors import DiskFull, FeaturescribeError

MANIFEST = "featurescribe-export.json"


# --------------------------------------------------------------------------------------------
# JSON: keys in the order the writer built them, floats in Python's shortest round-trip form,
# no NaN or infinity (they become null), UTF-8 text.


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_ENCODERS = {
    compact: json.JSONEncoder(ensure_ascii=False, allow_nan=False,
                              separators=(",", ":") if compact else (", ", ": "))
    for compact in (False, True)
}


def dumps(obj: Any, *, compact: bool = False) -> str:
    enc = _ENCODERS[compact]
    try:
        return enc.encode(obj)
    except ValueError:  # a NaN or an infinity somewhere
        return enc.encode(_finite(obj))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


class GzipJsonl:
    """A .jsonl.gz file whose bytes depend only on its lines: no file name, mtime 0."""

    def __init__(self, path: Path, level: int = 6):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open(path, "wb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=level)
        self._text = io.TextIOWrapper(self._gz, encoding="utf-8", newline="\n")
        self.rows = 0

    def write(self, row: Any) -> None:
        self._text.write(dumps(row) + "\n")
        self.rows += 1

    def close(self) -> None:
        self._text.close()  # closes the gzip stream, which leaves the raw file open
        self._raw.close()


class Batches:
    """Rows into DIR/batch-0.jsonl.gz, DIR/batch-1.jsonl.gz, ... of `size` rows each."""

    def __init__(self, folder: Path, size: int = 1024):
        self.folder, self.size = folder, size
        self.n_files = 0
        self.rows = 0
        self._cur: GzipJsonl | None = None

    def write(self, row: Any) -> None:
        if self._cur is None:
            self._cur = GzipJsonl(self.folder / f"batch-{self.n_files}.jsonl.gz")
        self._cur.write(row)
        self.rows += 1
        if self._cur.rows >= self.size:
            self.flush()

    def flush(self) -> None:
        """End the current file early (used to keep batch N of two folders on the same features)."""
        if self._cur is not None:
            self._cur.close()
            self._cur = None
            self.n_files += 1

    def close(self) -> None:
        self.flush()


def stable_id(*parts: Any) -> str:
    """A cuid-shaped (25 characters, starting with 'c') id that is the same on every export."""
    h = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return "c" + h[:24]


def preferred_score(scores: list[dict], scorer: str) -> dict | None:
    """An explanation's score of one scorer to report: the test split first, then by simulator."""
    rows = [s for s in scores if s["scorer"] == scorer]
    rows.sort(key=lambda s: (s["split"] != "test", s["split"] or "", s["simulator"] or ""))
    return rows[0] if rows else None


# --------------------------------------------------------------------------------------------
# names other tools expect


def neuronpedia_model_id(model_id: str) -> str:
    """Neuronpedia's model id for ours: the last path part, lower case, only [a-z0-9_-].

    `smollm2-135m` stays `smollm2-135m`; `HuggingFaceTB/SmolLM2-135M` and
    `/models/SmolLM2-135M/` become `smollm2-135m`.
    """
    name = model_id.rstrip("/\\").replace("\\", "/").split("/")[-1] or model_id
    name = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")
    return name or "model"


def source_set_name(source_id: str) -> str:
    """`6-res-sae16` -> `res-sae16`: Neuronpedia's source set is the id without the layer."""
    head, _, rest = source_id.partition("-")
    return rest if head.isdigit() and rest else source_id


def site_of(source: dict) -> str:
    site = (source.get("site") or "").lower()
    if site:
        return site
    rest = source_set_name(source["source_id"])
    for key, name in (("mlp", "mlp"), ("res", "resid"), ("att", "attn")):
        if rest.startswith(key):
            return name
    return rest


def delphi_module(source: dict) -> str:
    """delphi's hookpoint name: `layers.6.mlp`, `layers.6` (residual stream), `layers.6.self_attn`."""
    layer = source["layer"]
    site = site_of(source)
    if site == "mlp":
        return f"layers.{layer}.mlp"
    if site in ("resid", "res", "residual"):
        return f"layers.{layer}"
    if site in ("attn", "attention"):
        return f"layers.{layer}.self_attn"
    return f"layers.{layer}.{site}"


def model_name_of(spec: str | None) -> str:
    """`openai:gpt-4o-mini` -> `gpt-4o-mini`; `baseline:tokens` -> `baseline-tokens`."""
    if not spec:
        return "none"
    from featurescribe.llm.registry import is_llm_spec

    backend, _, model = spec.partition(":")
    if is_llm_spec(spec) and model:
        return model
    return spec.replace(":", "-")


# --------------------------------------------------------------------------------------------
# all-or-nothing output


def _is_previous_export(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _cannot_write(out: Path, err: OSError) -> FeaturescribeError:
    if err.errno == errno.ENOSPC:  # not bad input: exit 1, as a full disk is in every command
        return DiskFull(f"cannot write to {out}: the disk is full; nothing was written: free some space "
                        "and run the same command again")
    return FeaturescribeError(f"cannot write to {out}: {err.strerror or err}")


def check_output_dir(out: Path) -> None:
    """What `output_dir` refuses before any work."""
    if out.exists() and not out.is_dir():
        raise FeaturescribeError(f"cannot export to {out}: it is a file, not a folder")
    if out.is_dir() and os.path.ismount(out):
        raise FeaturescribeError(
            f"cannot export to {out}: it is a mount point, which an export cannot replace; "
            f"export to a folder inside it, e.g. --out {out / 'export'}"
        )
    if out.is_dir() and any(out.iterdir()) and not _is_previous_export(out):
        raise FeaturescribeError(
            f"cannot export to {out}: the folder is not empty and is not an earlier export; "
            "choose another folder"
        )


@contextmanager
def output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it becomes `out`.

    `out` may be missing, an empty folder, or an earlier featurescribe export (replaced whole).
    Anything else is refused before any work. On an error nothing is left behind.
    """
    out = Path(out)
    check_output_dir(out)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as err:
        raise _cannot_write(out, err) from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(out, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def output_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out` atomically."""
    out = Path(out)
    if out.is_dir():
        raise FeaturescribeError(f"cannot write {out}: it is a folder")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=parent)
        os.close(fd)
    except OSError as err:
        raise _cannot_write(out, err) from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(out, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
