"""Sparse autoencoders in SAELens' on-disk format: `cfg.json` + `sae_weights.safetensors`.

Weights: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and for
JumpReLU `threshold [d_sae]` (or `log_threshold`); gated SAEs have `b_gate`, `r_mag`, `b_mag`.

Config: the SAELens 6 layout (`architecture`, `d_in`, `d_sae`, `apply_b_dec_to_input`,
`normalize_activations`, `k` for TopK, and `metadata` — or `meta` — holding `hook_name`,
`model_name`, ...) and the older flat layout (`hook_name` or `hook_point`, `hook_layer`,
`activation_fn_str` / `activation_fn` with `activation_fn_kwargs: {"k": K}` for TopK,
`architecture` standard|gated|jumprelu). Encoding follows SAELens:

    x' = norm(x) - b_dec * apply_b_dec_to_input
    pre = x' @ W_enc + b_enc
    standard/ReLU: relu(pre)      TopK: relu of the k largest of pre, 0 elsewhere
    JumpReLU: relu(pre) * (pre > threshold)
    gated: (x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc * exp(r_mag)) + b_mag)
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurescribe.errors import FeaturescribeError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str  # standard | topk | jumprelu | gated
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    hook_name: str | None = None
    hook_layer: int | None = None
    model_name: str | None = None
    dtype: str = "float32"
    raw: dict[str, Any] = field(default_factory=dict)


def parse_config(cfg: dict[str, Any], where: str = CFG_FILE) -> SAEConfig:
    """Read both config layouts into one `SAEConfig`."""
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    if not isinstance(meta, dict):
        meta = {}

    def pick(*names, default=None):
        for n in names:
            if n in cfg and cfg[n] is not None:
                return cfg[n]
            if n in meta and meta[n] is not None:
                return meta[n]
        return default

    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise FeaturescribeError(f"{where}: needs integer fields d_in and d_sae") from None
    act = str(pick("activation_fn", "activation_fn_str", default="relu")).lower()
    arch = str(cfg.get("architecture") or ("topk" if act == "topk" else "standard")).lower()
    arch = {"relu": "standard", "jump_relu": "jumprelu", "top_k": "topk"}.get(arch, arch)
    if arch == "standard" and act == "topk":  # old flat configs: standard architecture, topk activation
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise FeaturescribeError(f"{where}: architecture {arch!r} is not supported "
                                 f"(supported: {', '.join(ARCHITECTURES)})")
    k = None
    if arch == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if k is None:
            raise FeaturescribeError(f"{where}: a TopK SAE needs k (field k or activation_fn_kwargs.k)")
        k = int(k)
        if not 0 < k <= d_sae:
            raise FeaturescribeError(f"{where}: k={k} must be between 1 and d_sae={d_sae}")
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    layer = pick("hook_layer")
    return SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=str(norm),
        hook_name=pick("hook_name", "hook_point"),
        hook_layer=int(layer) if layer is not None else None,
        model_name=pick("model_name"),
        dtype=str(cfg.get("dtype") or "float32"),
        raw=cfg,
    )


# SAE hook names we can map to (site, layer): TransformerLens names and HF module paths.
_HOOK_PATTERNS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid", 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid", -1),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out", 0),
    (re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$"), "mlp", 0),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn", 0),
    (re.compile(r"^(?:model\.)?layers\.(\d+)(?:\.output)?$"), "resid", 0),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.down_proj\.input$"), "mlp", 0),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp(?:\.output)?$"), "mlp_out", 0),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn(?:\.o_proj)?(?:\.output)?$"), "attn", 0),
]


def site_of_hook(hook_name: str | None) -> tuple[str, int] | None:
    """(site, layer) for a known SAE hook name, None for one we cannot read."""
    if not hook_name:
        return None
    for pat, site, shift in _HOOK_PATTERNS:
        m = pat.match(hook_name)
        if m:
            return site, int(m.group(1)) + shift
    return None


class SAE:
    """An SAE's encoder on a torch device. `encode(x)` maps [..., d_in] -> [..., d_sae]."""

    def __init__(self, cfg: SAEConfig, weights: dict, path: str = ""):
        import torch

        self.cfg, self.path = cfg, path
        need = ["W_enc", "b_dec"] + (["b_gate", "r_mag", "b_mag"] if cfg.architecture == "gated" else ["b_enc"])
        missing = [n for n in need if n not in weights]
        if cfg.architecture == "jumprelu" and "threshold" not in weights and "log_threshold" not in weights:
            missing.append("threshold")
        if missing:
            raise FeaturescribeError(f"SAE {path}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
        w = {k: v for k, v in weights.items()}
        if w["W_enc"].shape != (cfg.d_in, cfg.d_sae):
            raise FeaturescribeError(f"SAE {path}: W_enc has shape {tuple(w['W_enc'].shape)}, "
                                     f"expected [d_in, d_sae] = [{cfg.d_in}, {cfg.d_sae}]")
        if "threshold" not in w and "log_threshold" in w:
            w["threshold"] = torch.exp(w["log_threshold"])
        self.W_enc = w["W_enc"]
        self.W_dec = w.get("W_dec")  # not needed to encode; the logit lens reads it
        self.b_dec = w["b_dec"]
        self.b_enc = w.get("b_enc")
        self.threshold = w.get("threshold")
        self.b_gate, self.r_mag, self.b_mag = w.get("b_gate"), w.get("r_mag"), w.get("b_mag")
        if cfg.normalize_activations not in ("none", "constant_norm_rescale", "layer_norm"):
            warnings.warn(f"SAE {path}: normalize_activations={cfg.normalize_activations!r} needs a "
                          "dataset scaling factor this file does not carry; encoding the raw activations",
                          stacklevel=2)

    @property
    def width(self) -> int:
        return self.cfg.d_sae

    def to(self, device, dtype=None) -> "SAE":
        for name in ("W_enc", "W_dec", "b_dec", "b_enc", "threshold", "b_gate", "r_mag", "b_mag"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype or t.dtype))
        return self

    @property
    def dtype(self):
        return self.W_enc.dtype

    def encode(self, x):
        import torch

        x = x.to(self.W_enc.dtype)
        norm = self.cfg.normalize_activations
        if norm == "constant_norm_rescale":
            x = x * (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
        elif norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        arch = self.cfg.architecture
        if arch == "gated":
            gate = (x @ self.W_enc + self.b_gate) > 0
            mag = torch.relu(x @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
            return mag * gate
        pre = x @ self.W_enc + self.b_enc
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        # topk
        top = torch.topk(pre, k=self.cfg.k, dim=-1)
        out = torch.zeros_like(pre)
        return out.scatter_(-1, top.indices, torch.relu(top.values))


def load_sae(path: str | Path, device: str = "cpu", dtype=None) -> SAE:
    """Load an SAE folder (cfg.json + sae_weights.safetensors) onto `device`."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FeaturescribeError(f"--sae {path}: not a folder (expected {CFG_FILE} and {WEIGHTS_FILE} in it)")
    cfg_file, w_file = p / CFG_FILE, p / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FeaturescribeError(f"--sae {path}: missing {f.name} (SAELens format: {CFG_FILE} + {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FeaturescribeError(f"--sae {path}: {CFG_FILE} is not valid JSON ({err})") from None
    cfg = parse_config(raw, str(cfg_file))
    try:
        weights = load_file(str(w_file), device="cpu")
    except Exception as err:  # noqa: BLE001 - a broken file is the user's to fix
        raise FeaturescribeError(f"--sae {path}: cannot read {WEIGHTS_FILE}: {err}") from None
    sae = SAE(cfg, weights, str(p.resolve()))
    return sae.to(device, dtype)
