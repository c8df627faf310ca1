"""Reading an SAE folder's files, with one clear error for each way they can be broken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from featurescribe.errors import FeaturescribeError


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FeaturescribeError(f"--sae {path.parent}: {path.name} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise FeaturescribeError(f"--sae {path.parent}: {path.name} is not a JSON object")
    return raw


def read_safetensors(path: Path) -> dict:
    """Every tensor of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - a broken file is the user's to fix
        raise FeaturescribeError(f"--sae {path.parent}: cannot read {path.name}: {err}") from None
