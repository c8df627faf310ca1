"""The intervention of a feature of a harvested source, and the source's model to run it on.

Strength is in multiples of the feature's max activation (`features.max_act`; 1 when the feature
never fired):

- an MLP neuron, or a unit of the residual stream, attention or MLP output, is clamped to
  `strength * max_act` at every position (strength 0 ablates it);
- an SAE latent adds `strength * max_act * W_dec[latent]` to the hooked activation at every
  position (the latent's decoder row, as if it fired at `strength` times its max; divided by the
  row's norm for a TopK SAE with `rescale_acts_by_decoder_norm`, whose latents carry that norm).

The model comes from the process's one copy of it (the `local:` LLM backend's registry: a judge
`local:MODEL` of the same model shares it); steering work runs under the model's lock, so a hook
never sees another caller's forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featurescribe.errors import FeaturescribeError
from featurescribe.steer.generate import Steerer
from featurescribe.steer.hooks import HookPoint, Intervention, hook_point


def source_site(source: dict) -> str:
    """The site of a `sources` row (older rows without `site` name it in hook_name)."""
    if source.get("site"):
        return str(source["site"])
    from featurescribe.harvest.sae import site_of_hook

    found = site_of_hook(source.get("hook_name"))
    if found is None:
        raise FeaturescribeError(f"source {source['source_id']!r} records no site and its hook "
                                 f"{source.get('hook_name')!r} is not one featurescribe can steer")
    return found[0]


@dataclass
class SourceSteering:
    """A source's model, hook point and (for SAE sources) decoder, ready to steer its features."""

    source: dict
    local: Any  # llm.backends.local.LocalModel: model, tokenizer, lock, executor
    point: HookPoint
    sae: Any = None

    @property
    def steerer(self) -> Steerer:
        if not hasattr(self, "_steerer"):
            self._steerer = Steerer(self.local.model, self.local.tokenizer, self.point)
        return self._steerer

    def intervention(self, feature_id: int, max_act: float | None) -> Intervention:
        width = int(self.source["width"])
        if not 0 <= int(feature_id) < width:
            raise FeaturescribeError(f"feature {feature_id} is outside source {self.source['source_id']!r}, "
                                     f"which has features 0 to {width - 1}")
        scale = float(max_act) if max_act and max_act > 0 else 1.0
        if self.sae is not None:
            direction = self.sae.decoder_row(int(feature_id)).detach().float()
            return Intervention("add", scale, direction=direction)
        return Intervention("clamp", scale, unit=int(feature_id))


def _local_model(model_id: str, device: str):
    from featurescribe.llm.backends.local import get_local_model

    try:
        return get_local_model(model_id, device=device)
    except FeaturescribeError as err:
        raise FeaturescribeError(f"cannot load the model of this source: {err}") from None


def _load_decoder(source: dict, device):
    from featurescribe.harvest.sae import load_sae

    sae = load_sae(source["sae_path"], device=str(device))
    if sae.W_dec is None:
        raise FeaturescribeError(f"the SAE {source['sae_path']} has no decoder (W_dec): its latents cannot be steered")
    if sae.width != int(source["width"]):
        raise FeaturescribeError(f"the SAE {source['sae_path']} has {sae.width} latents but source "
                                 f"{source['source_id']!r} records {source['width']}")
    return sae


def load_source_steering(source: dict, device: str = "auto") -> SourceSteering:
    """Load what steering a source needs; one clear error when the model, its hook or the SAE is
    not usable here."""
    local = _local_model(str(source["model_id"]), device)
    site = source_site(source)
    with local.lock:
        point = hook_point(local.model, site, int(source["layer"]))
    sae = None
    if source.get("kind") == "sae" or source.get("sae_path"):
        if not source.get("sae_path"):
            raise FeaturescribeError(f"source {source['source_id']!r} is an SAE source without sae_path")
        sae = _load_decoder(source, local.device)
        if sae.cfg.d_in != point.width:
            raise FeaturescribeError(f"the SAE's d_in {sae.cfg.d_in} differs from the width {point.width} "
                                     f"of {point.name}")
    elif point.width != int(source["width"]):
        raise FeaturescribeError(f"{point.name} has width {point.width} but source "
                                 f"{source['source_id']!r} records {source['width']}")
    return SourceSteering(source, local, point, sae)


def check_source_steerable(source: dict) -> None:
    """Raise the error loading would meet, without loading: an unknown or missing model, an SAE
    folder that is gone, a site featurescribe cannot steer."""
    from pathlib import Path

    from featurescribe.harvest.models import resolve_model

    try:
        resolve_model(str(source["model_id"]))
    except FeaturescribeError as err:
        raise FeaturescribeError(f"cannot load the model of source {source['source_id']!r}: {err}") from None
    source_site(source)
    if source.get("sae_path") and not Path(str(source["sae_path"])).is_dir():
        raise FeaturescribeError(f"the SAE of source {source['source_id']!r} is gone: {source['sae_path']} "
                                 "is not a folder")
