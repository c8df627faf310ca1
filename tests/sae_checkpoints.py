"""Checkpoints written in the exact on-disk layouts of EleutherAI sparsify and SAELens transcoders,
with random weights, and their latents written out by hand (independently of featurescribe)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def write_sparsify(folder, d_in: int, latents: int, k: int, *, transcode: bool = False, activation: str = "topk",
                   seed: int = 0, scale: float = 1.0, dtype=torch.float32, num_latents_field: int | None = None) -> dict:
    """A hookpoint folder as sparsify's `save_to_disk` leaves it; returns the weights (float32)."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "encoder.weight": torch.randn(latents, d_in, generator=g) * scale / d_in ** 0.5,
        "encoder.bias": torch.randn(latents, generator=g) * 0.1,
        "W_dec": torch.randn(latents, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
    }
    cfg = {"activation": activation, "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": latents if num_latents_field is None else num_latents_field, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": d_in}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: t.to(dtype).contiguous() for n, t in w.items()}, str(folder / "sae.safetensors"))
    return {n: t.to(dtype).float() for n, t in w.items()}


def sparsify_latents(w: dict, x: torch.Tensor, k: int, *, transcode: bool = False,
                     activation: str = "topk") -> torch.Tensor:
    """relu(encoder(x - b_dec)) (no b_dec for a transcoder), then top-k or group-max, dense."""
    x = x.float()
    if not transcode:
        x = x - w["b_dec"]
    acts = torch.relu(F.linear(x, w["encoder.weight"], w["encoder.bias"]))
    out = torch.zeros_like(acts)
    if activation == "topk":
        vals, idx = acts.topk(k, dim=-1)
        return out.scatter(-1, idx, vals)
    size = acts.shape[-1] // k
    for g in range(k):
        block = acts[..., g * size:(g + 1) * size]
        vals, idx = block.max(dim=-1, keepdim=True)
        out.scatter_(-1, idx + g * size, vals)
    return out


def saelens_weights(g: torch.Generator, d_in: int, d_sae: int, d_out: int, *, scale: float,
                    b_dec_scale: float) -> dict:
    """Random SAELens encoder/decoder weights, drawn in a fixed order from `g`."""
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * scale / d_in ** 0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_out, generator=g),
        "b_dec": torch.randn(d_out, generator=g) * b_dec_scale,
    }


def write_saelens_transcoder(folder, d_in: int, d_sae: int, d_out: int, *, arch: str = "transcoder",
                             hook_name: str | None = None, hook_name_out: str | None = None,
                             seed: int = 0, scale: float = 1.0) -> dict:
    """A transcoder folder as SAELens 6 saves it (cfg.json + sae_weights.safetensors)."""
    g = torch.Generator().manual_seed(seed)
    w = saelens_weights(g, d_in, d_sae, d_out, scale=scale, b_dec_scale=0.5)
    if arch == "jumprelu_transcoder":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    if arch == "skip_transcoder":
        w["W_skip"] = torch.randn(d_out, d_in, generator=g) * 0.01
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": "smollm2-135m", "hook_name": hook_name, "hook_name_out": hook_name_out,
                        "hook_head_index_out": None, "sae_lens_version": "6.5.0", "prepend_bos": True,
                        "context_size": 64}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


def transcoder_latents(w: dict, arch: str, x: torch.Tensor) -> torch.Tensor:
    """A SAELens transcoder's encode: the input as it is (b_dec lives in the output space)."""
    pre = x.float() @ w["W_enc"] + w["b_enc"]
    if arch == "jumprelu_transcoder":
        return torch.where(pre > w["threshold"], torch.relu(pre), torch.zeros_like(pre))
    return torch.relu(pre)
