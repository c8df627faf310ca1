"""Sparse autoencoders and transcoders for the harvest: the folders a `--sae` argument names,
their format (detected from the files), loading, and where each one reads.

| format | files in the folder | module |
|---|---|---|
| SAELens (SAEs and transcoders) | `cfg.json` + `sae_weights.safetensors` | `sae_saelens.py` |
| EleutherAI sparsify (SAEs and transcoders) | `cfg.json` + `sae.safetensors`, the folder named by its hookpoint | `sae_sparsify.py` |
| Gemma Scope (JumpReLU SAEs of Gemma 2; `--layer` and `--site` say where) | `params.npz` | `sae_gemmascope.py` |

`--sae DIR` names either one SAE's folder, or a folder of such folders (a sparsify run saves one
folder per hookpoint: `layers.0`, `layers.1`, ..., `layers.6.mlp`; a run with several seeds adds
`seed0`, ... inside each). `sae_dirs(DIR)` lists the SAE folders DIR stands for, in natural
order; `load_sae` loads one of them and refuses a DIR that holds several with a line listing them.

Every format loads into one `SAE` (`sae_model.py`): `.cfg.hook_name`, `.cfg.d_in`, `.width`,
`.to(device, dtype)`, `.dtype`, `.encode(x)`. `resolve_sae_site(sae, layer, site)` gives the
(site, layer) it reads, and `check_sae_fits(sae, site)` refuses an SAE whose `d_in` is not the
site's width; both run before any forward pass over the corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest import sae_gemmascope
from featurescribe.harvest.sae_hooks import names_another_tensor, site_of_hook
from featurescribe.harvest.sae_model import ARCHITECTURES, SAE, SAEConfig
from featurescribe.harvest.sae_saelens import CFG_FILE, WEIGHTS_FILE, load_saelens, parse_config
from featurescribe.harvest.sae_sparsify import WEIGHTS_FILE as SPARSIFY_WEIGHTS_FILE
from featurescribe.harvest.sae_sparsify import load_sparsify

__all__ = ["ARCHITECTURES", "FORMATS", "SAE", "SAEConfig", "check_sae_fits", "load_sae", "parse_config",
           "resolve_sae_site", "sae_dirs", "site_of_hook"]


@dataclass(frozen=True)
class SAEFormat:
    name: str
    files: tuple[str, ...]  # what a folder of this format holds
    load: Callable[..., SAE]  # (folder, dtype that replaces the file's or None) -> an SAE on the CPU


FORMATS = (
    SAEFormat("SAELens", (CFG_FILE, WEIGHTS_FILE), load_saelens),
    SAEFormat("sparsify", (CFG_FILE, SPARSIFY_WEIGHTS_FILE), load_sparsify),
    SAEFormat("Gemma Scope", (sae_gemmascope.WEIGHTS_FILE,), sae_gemmascope.load_gemmascope),
)
_LAYOUTS = " or ".join(f"{' + '.join(f.files)} ({f.name})" for f in FORMATS)


def format_of(folder: Path) -> SAEFormat | None:
    """The format of an SAE folder, None when it holds no complete SAE."""
    return next((f for f in FORMATS if all((folder / name).is_file() for name in f.files)), None)


def _missing(folder: Path) -> str:
    """What an incomplete SAE folder lacks, for each format it holds a file of."""
    lacks = [" + ".join(n for n in f.files if not (folder / n).is_file())
             for f in FORMATS if any((folder / n).is_file() for n in f.files)]
    return " or ".join(dict.fromkeys(lacks))


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def _has_sae_files(folder: Path) -> bool:
    return any((folder / name).is_file() for f in FORMATS for name in f.files)


def _children(folder: Path) -> list[Path]:
    """SAE folders one level down, and the seedN folders inside those (sparsify, several seeds)."""
    found = []
    for d in (c for c in folder.iterdir() if c.is_dir()):
        if format_of(d):
            found.append(d)
        else:
            found += [s for s in d.iterdir() if s.is_dir() and re.fullmatch(r"seed\d+", s.name) and format_of(s)]
    return sorted(found, key=_natural_key)


def sae_dirs(path: str | Path) -> list[Path]:
    """The SAE folders that `--sae PATH` stands for: PATH itself, or the SAE folders inside it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FeaturescribeError(f"--sae {path}: not a folder (expected {_LAYOUTS} in it)")
    if _has_sae_files(p):
        if format_of(p) is None:
            raise FeaturescribeError(f"--sae {path}: missing {_missing(p)} (expected {_LAYOUTS})")
        return [p]
    found = _children(p)
    if not found:
        raise FeaturescribeError(f"--sae {path}: missing {CFG_FILE} (expected {_LAYOUTS}, "
                                 "or a folder of such folders, e.g. a sparsify run's hookpoint folders)")
    return found


def load_sae(path: str | Path, device: str = "cpu", dtype=None) -> SAE:
    """Load one SAE folder (any format of FORMATS) onto `device`; `dtype` (a torch dtype) replaces the
    config's, as SAELens' `load_from_disk(dtype=...)` does: the weights are cast once, to it."""
    dirs = sae_dirs(path)
    if len(dirs) > 1:
        names = ", ".join(d.relative_to(Path(path).expanduser()).as_posix() for d in dirs[:6])
        more = f", ... ({len(dirs)} in all)" if len(dirs) > 6 else ""
        raise FeaturescribeError(f"--sae {path} holds {len(dirs)} SAEs ({names}{more}): pass one of them, "
                                 f"e.g. --sae {dirs[0]}")
    folder = dirs[0]
    return format_of(folder).load(folder, dtype).to(device, dtype)


def load_saes(items: list) -> list[SAE]:
    """Loaded SAEs (ours or SAELens objects), and every SAE folder a path stands for (a sparsify
    run folder holds several)."""
    from featurescribe.harvest.sae_objects import sae_from_object

    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            out.extend(load_sae(d, device="cpu") for d in sae_dirs(item))
        else:
            out.append(sae_from_object(item))
    return out


def _hint(sae: SAE) -> str:  # for an SAE whose hook no site is
    if names_another_tensor(sae.cfg.hook_name):
        return " (a TransformerLens hook no harvest site reads; a site there would be another tensor)"
    return "" if sae.cfg.format == "sparsify" else ": give --layer and --site"


def resolve_sae_site(sae: SAE, layer: int | None = None, site: str | None = None) -> tuple[str, int]:
    """(site, layer) the SAE reads: its hook's, which must agree with `layer`/`site` when given.

    An SAELens SAE whose hook we cannot name reads the `site` asked (default `mlp`, or `mlp_in`
    for a transcoder) at `layer`; a TransformerLens hook we do not map (`blocks.6.hook_resid_mid`)
    is refused, since it names a tensor that no site is.
    """
    if sae.cfg.format == sae_gemmascope.FORMAT:
        return sae_gemmascope.place(sae, layer, site)
    name = sae.cfg.hook_name
    hooked = site_of_hook(name)
    if hooked is None:
        what = f"harvest cannot read its hook {name!r}" if name else "its config names no hook"
        if sae.cfg.format == "sparsify" or layer is None or names_another_tensor(name):
            raise FeaturescribeError(f"SAE {sae.path}: {what}" + _hint(sae))
        return site or ("mlp_in" if sae.cfg.transcoder else "mlp"), layer
    hooked_site, hooked_layer = hooked
    if hooked_layer < 0:
        raise FeaturescribeError(f"the SAE reads {name}, the token embeddings before layer 0, "
                                 "which harvest does not read")
    if site is not None and hooked_site != site:
        raise FeaturescribeError(f"the SAE was trained on {name} (site {hooked_site}), not on site {site}")
    if layer is not None and hooked_layer != layer:
        raise FeaturescribeError(f"the SAE was trained on {name} (layer {hooked_layer}), not on layer {layer}")
    return hooked_site, hooked_layer


def check_sae_fits(sae: SAE, site) -> None:
    """Refuse an SAE whose d_in is not the width of the `Site` (sites.Site) it reads."""
    if sae.cfg.d_in != site.width:
        hint = sae_gemmascope.width_hint(sae) if sae.cfg.format == sae_gemmascope.FORMAT else ""
        raise FeaturescribeError(
            f"SAE width mismatch: the SAE {Path(sae.path).name} reads d_in={sae.cfg.d_in} but site {site.site} "
            f"of layer {site.layer} ({site.hook_name}) has width {site.width}{hint}")
