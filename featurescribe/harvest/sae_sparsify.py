"""EleutherAI sparsify checkpoints: one folder per hookpoint, `cfg.json` + `sae.safetensors`.

The folder's name is the hookpoint, the module path sparsify hooked, relative to the model's
`base_model` (`layers.6` the decoder layer 6, `layers.6.mlp` its MLP; a run with several seeds
saves `layers.6/seed0`, ...). An SAE encodes that module's output; a transcoder
(`"transcode": true`) encodes the module's *input* (and predicts its output), so a transcoder at
`layers.6.mlp` reads the MLP's input and one at `layers.6` reads the residual stream before
layer 6 (= after layer 5).

`cfg.json`: `d_in`, `num_latents` (0: `expansion_factor * d_in`), `k`, `activation` (`topk`, the
default, or `groupmax`), `transcode`, and training-only fields (`normalize_decoder`,
`multi_topk`, `skip_connection`). `sae.safetensors`: `encoder.weight [num_latents, d_in]`,
`encoder.bias [num_latents]`, `W_dec [num_latents, d_in]`, `b_dec [d_in]` (`W_skip` when trained
with a skip connection, which does not change the latents). Latents: `relu(encoder(x - b_dec))`
(no `b_dec` subtraction for a transcoder), then the k largest (`topk`) or the largest of each of
k equal groups (`groupmax`), 0 elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.sae_hooks import site_of_hook
from featurescribe.harvest.sae_model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")
_DEFAULT_EXPANSION, _DEFAULT_K = 32, 32  # sparsify's SparseCoderConfig defaults


def hookpoint_of(folder: Path) -> str:
    """The hookpoint a checkpoint folder was saved under (`layers.6`, or `layers.6` for `layers.6/seed0`)."""
    folder = Path(os.path.abspath(folder))  # not resolve(): a symlink's own name is the one the user chose
    return folder.parent.name if re.fullmatch(r"seed\d+", folder.name) else folder.name


def _int_field(raw: dict[str, Any], name: str, default: int, where: str) -> int:
    value = raw.get(name)
    try:
        return int(default if value is None else value)
    except (TypeError, ValueError):
        raise FeaturescribeError(f"{where}: {name} must be an integer, not {value!r}") from None


def parse_sparsify_config(raw: dict[str, Any], hookpoint: str, where: str = CFG_FILE) -> SAEConfig:
    if raw.get("d_in") is None:
        raise FeaturescribeError(f"{where}: a sparsify config needs d_in")
    d_in = _int_field(raw, "d_in", 0, where)
    latents = _int_field(raw, "num_latents", 0, where) or d_in * _int_field(
        raw, "expansion_factor", _DEFAULT_EXPANSION, where)
    k = _int_field(raw, "k", _DEFAULT_K, where)
    activation = str(raw.get("activation") or "topk").lower()
    if activation not in ACTIVATIONS:
        raise FeaturescribeError(f"{where}: activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
    if not 0 < k <= latents:
        raise FeaturescribeError(f"{where}: k={k} must be between 1 and num_latents={latents}")
    if activation == "groupmax" and latents % k:
        raise FeaturescribeError(f"{where}: groupmax needs num_latents={latents} to be a multiple of k={k}")
    if raw.get("signed"):  # EleutherAI/sae of mid-2024: top-k by magnitude, no ReLU
        raise FeaturescribeError(f"{where}: signed: true (latents of either sign) is not supported; "
                                 "harvest reads non-negative top-k latents")
    transcode = bool(raw.get("transcode", False))
    return SAEConfig(
        d_in=d_in, d_sae=latents, architecture=activation, k=k, apply_b_dec_to_input=not transcode,
        hook_name=f"{hookpoint}.input" if transcode else hookpoint,
        format="sparsify", transcoder=transcode, d_out=d_in if transcode else None, raw=raw,
    )


def _check_hookpoint(cfg: SAEConfig, hookpoint: str, folder: Path) -> None:
    if site_of_hook(cfg.hook_name) is None:
        what = "input" if cfg.transcoder else "output"
        raise FeaturescribeError(
            f"--sae {folder}: the sparsify hookpoint {hookpoint!r} (the folder's name; its {what} is encoded) "
            "is not one harvest can read: use a folder named layers.N or layers.N.mlp (SAE or transcoder), "
            "layers.N.self_attn (SAE), as sparsify names them")


def _weights(folder: Path, cfg: SAEConfig) -> dict:
    from featurescribe.harvest.sae_files import read_safetensors

    raw = read_safetensors(folder / WEIGHTS_FILE)
    need = ["encoder.weight", "encoder.bias"] + ([] if cfg.transcoder else ["b_dec"])
    missing = [n for n in need if n not in raw]
    if missing:
        raise FeaturescribeError(f"SAE {folder}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
    enc = raw["encoder.weight"]
    if tuple(enc.shape) != (cfg.d_sae, cfg.d_in):
        raise FeaturescribeError(f"SAE {folder}: {WEIGHTS_FILE}: encoder.weight has shape {tuple(enc.shape)}, "
                                 f"expected [num_latents, d_in] = [{cfg.d_sae}, {cfg.d_in}]")
    # SAELens' orientation, W_enc [d_in, d_sae]: a transposed view, no copy (matmul reads it as fast)
    w = {"W_enc": enc.T, "b_enc": raw["encoder.bias"], "b_dec": raw.get("b_dec"), "W_dec": raw.get("W_dec")}
    return {name: t for name, t in w.items() if t is not None}


def load_sparsify(folder: Path, dtype=None) -> SAE:
    """An SAE (or transcoder) from one sparsify hookpoint folder, on the CPU, in the file's dtype
    (`dtype` is applied by the caller)."""
    from featurescribe.harvest.sae_files import read_json

    hookpoint = hookpoint_of(folder)
    cfg = parse_sparsify_config(read_json(folder / CFG_FILE), hookpoint, str(folder / CFG_FILE))
    _check_hookpoint(cfg, hookpoint, folder)
    weights = _weights(folder, cfg)
    cfg.dtype = str(weights["W_enc"].dtype).replace("torch.", "")  # sparsify's config does not record it
    return SAE(cfg, weights, str(folder.resolve()), WEIGHTS_FILE)
