"""What one harvest reads: the sources (layer x site neurons, and SAEs at their own hooks).

`--layer` takes `6`, `3,6,9`, `0-29` or `all`; `--site` a comma list; `--sae` repeats. Neurons are
harvested at every layer x site when `--site` is given or no `--sae` is; each SAE is read at the hook
its config names (without `--site`, `--layer` then only checks the SAEs' layers). Every check here
runs before the database is opened: a bad combination is one error line and nothing written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from featurescribe.errors import BadOption, FeaturescribeError
from featurescribe.harvest.sae import SAE, check_sae_fits, resolve_sae_site, site_of_hook
from featurescribe.harvest.sae_hooks import after_post_norm
from featurescribe.harvest.sites import (POST_NORM_SITES, SITE_ABBR, SITES, Site, check_layer, check_site,
                                         has_post_norms)

DEFAULT_SITE = "mlp"
_LAYER_PART = re.compile(r"([0-9]+)(?:-([0-9]+))?")  # ASCII digits only: int() also reads '٣'
# a source id names export folders (delphi, oai, neuronpedia): '..' or 'a/b' would write outside them
_SOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def width_label(n: int) -> str:
    """4096 -> '4k', 16384 -> '16k', 1048576 -> '1m', 3000 -> '3000'."""
    if n % (1 << 20) == 0:
        return f"{n >> 20}m"
    if n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def default_source_id(layer: int, site: str, sae_width: int | None = None) -> str:
    """Neuronpedia style: '6-mlp' (neurons), '6-res-sae4k' (an SAE of width 4096 on resid)."""
    base = f"{layer}-{SITE_ABBR[site]}"
    return base if sae_width is None else f"{base}-sae{width_label(sae_width)}"


def parse_layers(spec, n_layers: int | None = None) -> list[int] | None:
    """`6`, `3,6,9`, `0-29`, `all` (needs n_layers), an int or a list -> sorted distinct layers."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return sorted({int(x) for x in spec})
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(n_layers)) if n_layers is not None else None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            m = _LAYER_PART.fullmatch(part.strip())
            if m is None:
                raise ValueError
            a, b = int(m[1]), int(m[2] or m[1])
            if b < a:
                raise ValueError
            layers.update(range(a, b + 1))
    except ValueError:
        raise BadOption(f"bad --layer {spec!r}: use a layer (6), a list (3,6,9), a range (0-29) "
                                 "or all") from None
    return sorted(layers)


def parse_sites(spec) -> list[str] | None:
    if spec is None:
        return None
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    sites = [check_site(p.strip()) for p in parts if p.strip()]
    if not sites:
        raise BadOption(f"bad --site {spec!r}: use a comma list of {', '.join(SITES)}")
    return list(dict.fromkeys(sites))


@dataclass
class SourcePlan:
    """One source of a harvest: where it reads, and (for an SAE) what encodes it."""

    source_id: str
    site: str
    layer: int
    sae: SAE | None = None
    width: int = 0  # set once the site is located (neurons) or from the SAE
    hook_name: str = ""

    @property
    def kind(self) -> str:
        return "sae" if self.sae is not None else "neuron"

    @property
    def key(self) -> tuple[str, int]:
        return self.site, self.layer


def _sae_place(sae: SAE, layers: list[int] | None, sites: list[str] | None) -> tuple[str, int]:
    if site_of_hook(sae.cfg.hook_name) is None:
        one_layer = layers[0] if layers is not None and len(layers) == 1 else None
        if one_layer is None or (sites is not None and len(sites) != 1):
            what = f"hook {sae.cfg.hook_name!r} names no site we know" if sae.cfg.hook_name else "it names no hook"
            raise FeaturescribeError(f"SAE {sae.path}: {what}; give one --layer and one --site for it")
        return resolve_sae_site(sae, one_layer, (sites or [None])[0])
    site, layer = resolve_sae_site(sae)
    if sites is None and layers is not None and layer not in layers:
        raise FeaturescribeError(f"the SAE was trained on {sae.cfg.hook_name} (layer {layer}), "
                                 f"not on layer {', '.join(map(str, layers))}")
    return site, layer


def check_source_id(source_id: str) -> None:
    if not _SOURCE_ID.fullmatch(source_id):
        raise BadOption(f"bad --source-id {source_id!r}: use letters, digits, '.', '-' and '_', starting with "
                        "a letter or digit (e.g. 6-mlp-v2)")


def plan_sources(layers: list[int] | None, sites: list[str] | None, saes: list[SAE],
                 source_id: str | None = None) -> list[SourcePlan]:
    """The sources of one harvest, before the model is looked at; duplicate ids are an error."""
    if layers is None and not saes:
        raise BadOption("--layer is needed (a layer, a list, a range or all)")
    plans = []
    if sites is not None or not saes:
        plans = [SourcePlan(default_source_id(layer, site), site, layer)
                 for layer in layers for site in (sites or [DEFAULT_SITE])]
    for sae in saes:
        site, layer = _sae_place(sae, layers, sites)
        plans.append(SourcePlan(default_source_id(layer, site, sae.width), site, layer, sae, sae.width))
    if source_id is not None:
        check_source_id(source_id)
        if len(plans) != 1:
            raise BadOption(f"--source-id names one source, but this harvest has {len(plans)} "
                                     f"({', '.join(p.source_id for p in plans)})")
        plans[0].source_id = source_id
    _check_unique(plans)
    return plans


def _check_unique(plans: list[SourcePlan]) -> None:
    seen: dict[str, SourcePlan] = {}
    for p in plans:
        if p.source_id in seen:
            what = [q.sae.path if q.sae is not None else f"layer {q.layer} {q.site}" for q in (seen[p.source_id], p)]
            raise FeaturescribeError(f"two sources would get the id {p.source_id} ({what[0]} and {what[1]}); "
                                     "harvest one of them separately with --source-id")
        seen[p.source_id] = p


def follow_post_norms(plans: list[SourcePlan], layers) -> None:
    """An SAE trained on TransformerLens's hook_mlp_out or hook_attn_out of a block with post-norms
    (Gemma 2/3) reads the normed output there: the sublayer's own output has the same width, so
    reading it would give other latents without a word. A default source id follows the site."""
    for p in plans:
        if p.sae is None or not after_post_norm(p.sae.cfg.hook_name) or not has_post_norms(layers[p.layer]):
            continue
        default = p.source_id == default_source_id(p.layer, p.site, p.sae.width)
        p.site = POST_NORM_SITES[p.site]
        if default:
            p.source_id = default_source_id(p.layer, p.site, p.sae.width)
    _check_unique(plans)


def bind_sites(plans: list[SourcePlan], sites: dict[tuple[str, int], Site]) -> None:
    """Give each source its hook and width; an SAE whose d_in does not fit its hook is an error."""
    for p in plans:
        s = sites[p.key]
        p.hook_name = s.hook_name
        if p.sae is None:
            p.width = s.width
        else:
            check_sae_fits(p.sae, s)


def check_layers(plans: list[SourcePlan], n: int) -> None:
    for p in plans:
        check_layer(p.layer, n)
