"""Gemma Scope (google/gemma-scope-*, SAEs of Gemma 2): one folder per SAE holding `params.npz`.

The hub repositories lay them out as `layer_L/width_16k/average_l0_N/params.npz` in
`gemma-scope-2b-pt-res` (the residual stream after layer L), `-mlp` (the MLP's output) and `-att`
(the attention heads' outputs). `params.npz`: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`,
`b_enc [d_sae]`, `b_dec [d_in]`, `threshold [d_sae]`, float32, and no config: nothing in the folder
names its hook, so `--layer` and `--site` say where it reads.

Latents (JumpReLU, as SAELens converts them): `pre = x @ W_enc + b_enc` (b_dec is not subtracted:
apply_b_dec_to_input false), `relu(pre) * (pre > threshold)` (strictly greater).

Sites, from the hooks SAELens gives each repository (TransformerLens names): `-res` reads
`blocks.L.hook_resid_post` = site `resid`; `-mlp` reads `blocks.L.hook_mlp_out`, which in Gemma 2
is after the post-MLP norm = site `mlp_out_normed` (not `mlp_out`, the MLP's own output, as wide);
`-att` reads `blocks.L.attn.hook_z`, the heads' outputs before `o_proj` (n_heads x head_dim wide),
which no site reads. The embedding SAEs (`embedding/...`) read the token embeddings, which no site
reads either; the transcoders (`gemma-scope-2b-pt-transcoders`) are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

from featurescribe.errors import FeaturescribeError
from featurescribe.harvest.sae_model import SAE, SAEConfig

WEIGHTS_FILE = "params.npz"
FORMAT = "gemmascope"  # SAEConfig.format
SITES = {"resid": "gemma-scope-*-res", "mlp_out_normed": "gemma-scope-*-mlp"}  # site -> the repositories
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_SITE_HELP = ("a Gemma Scope SAE reads --site resid (gemma-scope-*-res) or mlp_out_normed (-mlp: "
              "TransformerLens's hook_mlp_out, after Gemma 2's post-MLP norm); the -att SAEs read the heads' "
              "outputs before o_proj (attn.hook_z), which no site reads")


def _read_npz(folder: Path) -> dict:
    import numpy as np

    try:
        with np.load(folder / WEIGHTS_FILE) as data:
            # SAELens renames w_enc/w_dec to W_enc/W_dec
            return {("W_" + k[2:] if k.startswith("w_") else k): data[k] for k in data.files}
    except Exception as err:  # noqa: BLE001 - a broken file is the user's to fix
        raise FeaturescribeError(f"--sae {folder}: cannot read {WEIGHTS_FILE}: {err}") from None


def _weights(folder: Path) -> dict:
    import torch

    raw = _read_npz(folder)
    missing = [n for n in _TENSORS if n not in raw]
    if missing:
        raise FeaturescribeError(f"SAE {folder}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
    if raw["W_enc"].ndim != 2:
        raise FeaturescribeError(f"SAE {folder}: {WEIGHTS_FILE}: W_enc has shape {raw['W_enc'].shape}, "
                                 "expected [d_in, d_sae]")
    return {n: torch.from_numpy(raw[n]).to(torch.float32) for n in _TENSORS}


def load_gemmascope(folder: Path, dtype=None) -> SAE:
    """A Gemma Scope SAE from its folder, on the CPU, in float32 (as SAELens converts it; `dtype` is
    applied by the caller)."""
    if "embedding" in Path(folder).resolve().parts:
        raise FeaturescribeError(f"--sae {folder}: a Gemma Scope embedding SAE reads the token embeddings, "
                                 "which harvest does not read")
    w = _weights(folder)
    d_in, d_sae = w["W_enc"].shape
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", apply_b_dec_to_input=False,
                    format=FORMAT, dtype="float32")
    return SAE(cfg, w, str(Path(folder).resolve()), WEIGHTS_FILE)


def layer_in_path(path: str) -> int | None:
    """L of the `layer_L` folder of the hub's layout, when the path has one."""
    found = [int(m[1]) for part in Path(path).parts if (m := re.fullmatch(r"layer_(\d+)", part))]
    return found[-1] if found else None


def place(sae: SAE, layer: int | None, site: str | None) -> tuple[str, int]:
    """(site, layer) a Gemma Scope SAE reads: the ones given, which must both be there."""
    named = layer_in_path(sae.path)
    if layer is None or site is None:
        where = f" (its folder is layer_{named})" if named is not None else ""
        raise FeaturescribeError(f"SAE {sae.path}: {WEIGHTS_FILE} names no hook{where}: give --layer and --site "
                                 "(resid for gemma-scope-*-res, mlp_out_normed for -mlp)")
    if site not in SITES:
        raise FeaturescribeError(f"SAE {sae.path}: not site {site}: {_SITE_HELP}")
    if named is not None and named != layer:
        raise FeaturescribeError(f"SAE {sae.path}: its folder is Gemma Scope's layer_{named}, not layer {layer}")
    return site, layer


def width_hint(sae: SAE) -> str:
    return f" ({_SITE_HELP}; or the SAE is for another Gemma 2 size)"
