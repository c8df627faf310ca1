"""SAELens' on-disk format: `cfg.json` + `sae_weights.safetensors`, SAEs and transcoders.

Weights: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and for
JumpReLU `threshold [d_sae]` (or `log_threshold`); gated SAEs have `b_gate`, `r_mag`, `b_mag`.
Transcoders (`architecture` transcoder, skip_transcoder, jumprelu_transcoder) read one hook
(`hook_name`, the MLP's input) and predict another (`hook_name_out`, `d_out`): their `W_dec` is
[d_sae, d_out], `b_dec` [d_out], and the input is encoded without subtracting `b_dec`; a skip
transcoder's `W_skip` only matters to the output, not to the latents harvested.

Config: the SAELens 6 layout (`architecture`, `d_in`, `d_sae`, `apply_b_dec_to_input`,
`normalize_activations`, `k` and `rescale_acts_by_decoder_norm` for TopK, and `metadata` — or `meta` — holding `hook_name`,
`hook_name_out`, `model_name`, ...) and the older flat layout (`hook_name` or `hook_point`,
`hook_layer`, `activation_fn_str` / `activation_fn` with `activation_fn_kwargs: {"k": K}` for TopK,
`architecture` standard|gated|jumprelu; `finetuning_scaling_factor` with a `scaling_factor [d_sae]`
tensor, by which SAELens < 6 multiplied each latent before decoding: folded into W_dec's rows).

dtype: SAELens casts every tensor to the config's `dtype` when it loads (`load_from_disk(dtype=...)`
overrides it) and casts the input to it before encoding, so a bfloat16 file with `"dtype":
"float32"` is encoded in float32, and the reverse in bfloat16; we do the same. The config's
`device` is not read: SAELens replaces it with the device it loads onto, as we do.

`activation_scaler.json` (`{"scaling_factor": f}`, saved with every SAELens training checkpoint):
with `normalize_activations: expected_average_only_in` the SAE was trained on the input times f
(f = sqrt(d_in) / the mean input norm), and SAELens' evals scale the input by f before the SAE and
divide its output by f; when training ends SAELens folds f into the weights and writes null and
`none`. So a checkpoint's latents are encode(x * f), and a latent adds W_dec[i] / f to the output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.sae_files import read_json, read_safetensors
from featurescribe.harvest.sae_model import ARCHITECTURES, NORMALIZATIONS, SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
_ALIASES = {"relu": "standard", "jump_relu": "jumprelu", "top_k": "topk", "transcoder": "standard"}
_SAELENS_ARCHITECTURES = tuple(a for a in ARCHITECTURES if a != "groupmax")
_ACTIVATIONS = ("standard", "topk", "jumprelu")  # activation_fn values (after _ALIASES) we compute
DTYPES = ("float32", "float64", "float16", "bfloat16")  # SAELens' DTYPE_MAP, each also as "torch.NAME"


def _picker(cfg: dict[str, Any]):
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    if not isinstance(meta, dict):
        meta = {}

    def pick(*names, default=None):
        for n in names:
            for d in (cfg, meta):
                if d.get(n) is not None:
                    return d[n]
        return default

    return pick


def _architecture(cfg: dict[str, Any], act: str, where: str) -> tuple[str, bool]:
    """(architecture, is a transcoder) from `architecture` and the activation function."""
    if _ALIASES.get(act, act) not in _ACTIVATIONS:  # e.g. SAELens < 6's tanh-relu
        raise FeaturescribeError(f"{where}: activation_fn {act!r} is not supported (relu, topk or jumprelu)")
    arch = str(cfg.get("architecture") or ("topk" if act == "topk" else "standard")).lower()
    transcoder = arch == "transcoder" or arch.endswith("_transcoder")
    if transcoder and arch != "transcoder":
        arch = arch[: -len("_transcoder")]
        arch = "standard" if arch == "skip" else arch
    arch = _ALIASES.get(arch, arch)
    if arch == "standard" and act == "topk":  # old flat configs: standard architecture, topk activation
        arch = "topk"
    if arch not in _SAELENS_ARCHITECTURES:
        raise FeaturescribeError(f"{where}: architecture {cfg.get('architecture')!r} is not supported "
                                 f"(supported: {', '.join(_SAELENS_ARCHITECTURES)}, and their transcoders)")
    return arch, transcoder


def _topk_k(cfg: dict[str, Any], d_sae: int, where: str) -> int:
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if k is None:
        raise FeaturescribeError(f"{where}: a TopK SAE needs k (field k or activation_fn_kwargs.k)")
    if not 0 < int(k) <= d_sae:
        raise FeaturescribeError(f"{where}: k={k} must be between 1 and d_sae={d_sae}")
    return int(k)


def read_scaling_factor(folder: Path) -> float | None:
    """The factor in SAELens' activation_scaler.json, which a training checkpoint carries beside its
    cfg.json: the input was multiplied by it in training (normalize_activations
    'expected_average_only_in'). None without the file, or when it holds null (no such
    normalization, or the factor already folded into the weights, as at the end of training)."""
    path = folder / SCALER_FILE
    if not path.is_file():
        return None
    raw = read_json(path)
    if raw.get("has_whitening"):
        raise FeaturescribeError(f"--sae {folder}: {SCALER_FILE} says has_whitening (covariance_whitening "
                                 "of the input), which is not supported")
    factor = raw.get("scaling_factor")
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise FeaturescribeError(f"--sae {folder}: {SCALER_FILE}: scaling_factor must be a positive number "
                                 f"or null, not {factor!r}")
    return float(factor)


def _normalization(cfg: dict[str, Any], where: str, input_scale: float | None) -> str:
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = str(norm or "none")
    if norm == "expected_average_only_in" and input_scale is None:
        # the input was multiplied by a factor estimated on the training data; SAELens saves it in
        # activation_scaler.json with each checkpoint, and folds it into the weights when training ends
        raise FeaturescribeError(f"{where}: normalize_activations 'expected_average_only_in' needs the "
                                 f"dataset's norm scaling factor, which SAELens saves in {SCALER_FILE} beside "
                                 "a training checkpoint's cfg.json and this SAE does not carry: add that file, "
                                 "or fold the factor into the weights (SAELens: "
                                 "sae.fold_activation_norm_scaling_factor(f), then save_model)")
    if norm == "expected_average_only_in":
        return norm
    if input_scale is not None:
        raise FeaturescribeError(f"{where}: {SCALER_FILE} holds scaling_factor {input_scale} but "
                                 f"normalize_activations is {norm!r}: SAELens writes a factor only with "
                                 "'expected_average_only_in' (and null once it is folded into the weights)")
    if norm not in NORMALIZATIONS:
        raise FeaturescribeError(f"{where}: normalize_activations {norm!r} is not supported "
                                 f"({', '.join(NORMALIZATIONS)})")
    return norm


def _dtype(cfg: dict[str, Any], where: str) -> str:
    value = cfg.get("dtype") or "float32"
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise FeaturescribeError(f"{where}: dtype {value!r} is not one SAELens loads ({', '.join(DTYPES)})")
    return name


def parse_config(cfg: dict[str, Any], where: str = CFG_FILE, input_scale: float | None = None) -> SAEConfig:
    """Read both SAELens config layouts, SAEs and transcoders, into one `SAEConfig`; `input_scale`
    is the factor of the folder's activation_scaler.json."""
    pick = _picker(cfg)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg["d_out"]) if cfg.get("d_out") is not None else None
    except (KeyError, TypeError, ValueError):
        raise FeaturescribeError(f"{where}: needs integer fields d_in and d_sae") from None
    act = str(pick("activation_fn", "activation_fn_str", default="relu")).lower()
    arch, transcoder = _architecture(cfg, act, where)
    layer = pick("hook_layer")
    return SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, k=_topk_k(cfg, d_sae, where) if arch == "topk" else None,
        rescale_acts_by_decoder_norm=arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm")),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
        normalize_activations=_normalization(cfg, where, input_scale), input_scale=input_scale,
        hook_name=pick("hook_name", "hook_point"),
        hook_layer=int(layer) if layer is not None else None,
        model_name=pick("model_name"),
        dtype=_dtype(cfg, where),
        format="saelens", transcoder=transcoder,
        d_out=(d_out or d_in) if transcoder else None,
        hook_name_out=pick("hook_name_out") if transcoder else None,
        raw=cfg,
    )


def _fold_finetuning_scale(weights: dict, cfg: dict[str, Any], d_sae: int, where: str) -> dict:
    """SAELens < 6 with `finetuning_scaling_factor: true` multiplies each latent by the weights'
    `scaling_factor` before decoding: the latents are unchanged, W_dec's rows take the factor. One of
    all ones is dropped, as SAELens does."""
    import torch

    scale = weights.pop("scaling_factor", None)
    if scale is None or torch.allclose(scale, torch.ones_like(scale)):
        return weights
    if not cfg.get("finetuning_scaling_factor"):
        raise FeaturescribeError(f"{where}: the weights hold a scaling_factor but finetuning_scaling_factor "
                                 "is not true (SAELens refuses this too)")
    if tuple(scale.shape) != (d_sae,):
        raise FeaturescribeError(f"{where}: scaling_factor has shape {tuple(scale.shape)}, expected [{d_sae}]")
    if "W_dec" in weights:
        weights["W_dec"] = weights["W_dec"] * scale[:, None]
    return weights


def load_saelens(folder: Path, dtype=None) -> SAE:
    """An SAE (or transcoder) from a SAELens folder, on the CPU, in the config's dtype or `dtype`,
    which replaces it as SAELens' `load_from_disk(dtype=...)` does (the file is cast once)."""
    import torch

    raw_cfg = read_json(folder / CFG_FILE)
    if dtype is not None:
        raw_cfg["dtype"] = str(dtype)
    cfg = parse_config(raw_cfg, str(folder / CFG_FILE), read_scaling_factor(folder))
    dtype = getattr(torch, cfg.dtype)
    weights = {name: t.to(dtype) for name, t in read_safetensors(folder / WEIGHTS_FILE).items()}
    weights = _fold_finetuning_scale(weights, raw_cfg, cfg.d_sae, str(folder / WEIGHTS_FILE))
    return SAE(cfg, weights, str(folder.resolve()), WEIGHTS_FILE)
