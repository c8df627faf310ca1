"""Interventions at one module of a model, applied per batch row.

An `Intervention` says what to do at a site:

- `clamp`: set unit `unit` of the hooked tensor to `strength * scale` at every position (an MLP
  neuron clamped to a multiple of its max activation; strength 0 ablates it);
- `add`: add `strength * scale * direction` at every position (an SAE latent's decoder row, or
  any direction in the residual stream).

`steering(model, where, intervention, strengths)` applies it while the block runs; `strengths`
holds one value per batch row, and a row whose strength is None is left untouched, so steered and
unsteered rows share one forward pass. The hook is removed on exit: the model is left as found.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

from featurescribe.errors import FeaturescribeError

MODES = ("clamp", "add")


@dataclass
class HookPoint:
    """A module of the model and whether its input or its output is changed."""

    module: Any
    io: str  # 'input' | 'output'
    name: str
    width: int


@dataclass
class Intervention:
    mode: str  # 'clamp' | 'add'
    scale: float  # what strength 1 means, in the hooked tensor's units
    unit: int | None = None  # clamp: the unit
    direction: Any = None  # add: a torch vector of the hooked tensor's width

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FeaturescribeError(f"unknown intervention mode {self.mode!r}: use {', '.join(MODES)}")
        if self.mode == "clamp" and self.unit is None:
            raise FeaturescribeError("a clamp intervention needs a unit")
        if self.mode == "add" and self.direction is None:
            raise FeaturescribeError("an add intervention needs a direction")


def hook_point(model, site: str, layer: int) -> HookPoint:
    """The module of `site` at `layer` (the harvest's site names; a clear error when the model
    lacks it)."""
    from featurescribe.harvest.sites import SiteReader

    reader = SiteReader(model, site, layer)
    return HookPoint(reader.module, reader.io, reader.site.hook_name, reader.site.width)


def _row_values(strengths: Sequence[float | None], scale: float, like):
    """(values [B], active [B] bool) on the device and dtype of `like`."""
    import torch

    vals = [0.0 if s is None else float(s) * scale for s in strengths]
    active = [s is not None for s in strengths]
    return (torch.tensor(vals, device=like.device, dtype=like.dtype),
            torch.tensor(active, device=like.device))


def apply(x, intervention: Intervention, strengths: Sequence[float | None]):
    """The steered copy of `x` [batch, seq, width]; rows with strength None are unchanged."""
    import torch

    if x.shape[0] != len(strengths):
        raise ValueError(f"{len(strengths)} strengths for a batch of {x.shape[0]}")
    vals, active = _row_values(strengths, intervention.scale, x)
    if intervention.mode == "clamp":
        unit = int(intervention.unit)
        out = x.clone()
        col = torch.where(active[:, None], vals[:, None].expand(-1, x.shape[1]), x[..., unit])
        out[..., unit] = col
        return out
    d = intervention.direction.to(device=x.device, dtype=x.dtype)
    return x + (vals * active)[:, None, None] * d


@contextlib.contextmanager
def steering(point: HookPoint, intervention: Intervention | None, strengths: Sequence[float | None]):
    """Apply `intervention` at `point` per batch row while the block runs."""
    if intervention is None or all(s is None for s in strengths):
        yield
        return

    def pre_hook(module, args, kwargs):
        return (apply(args[0], intervention, strengths), *args[1:]), kwargs

    def post_hook(module, args, output):
        if isinstance(output, tuple):
            return (apply(output[0], intervention, strengths), *output[1:])
        return apply(output, intervention, strengths)

    if point.io == "input":
        handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = point.module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
