"""SAEs already in memory: a SAELens `SAE` object (or anything shaped like one) as our `SAE`.

A SAELens 6 SAE carries its config (`cfg.to_dict()`: `architecture`, `d_in`, `d_sae`, `k`,
`metadata.hook_name`, ...) and its weights (`state_dict()`: `W_enc`, `b_enc`, `W_dec`, `b_dec`,
`threshold`, ...) in the names of its on-disk format, so the same reader (`parse_config`) and
encoder serve both; SAELens itself is never imported here.
"""

from __future__ import annotations

from typing import Any

from featurescribe.errors import BadOption
from featurescribe.harvest.sae_model import SAE
from featurescribe.harvest.sae_saelens import parse_config


def _config_dict(obj: Any) -> dict | None:
    cfg = getattr(obj, "cfg", None)
    to_dict = getattr(cfg, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def sae_from_object(obj: Any) -> SAE:
    """Our `SAE` for a SAELens SAE object (its weights copied to the CPU, in its config's dtype, which
    SAELens keeps equal to its weights' and encodes in)."""
    import torch

    if isinstance(obj, SAE):
        return obj
    raw = _config_dict(obj)
    if raw is None or not callable(getattr(obj, "state_dict", None)):
        raise BadOption(f"sae: a {type(obj).__name__} is neither an SAE folder nor a SAELens SAE "
                        "(an object with cfg.to_dict() and state_dict())")
    name = f"{type(obj).__name__} in memory"
    cfg = parse_config(raw, where=name)
    dtype = getattr(torch, cfg.dtype)
    weights = {k: v.detach().to("cpu", dtype) for k, v in obj.state_dict().items()}
    return SAE(cfg, weights, path=name, weights_file="state_dict()")
