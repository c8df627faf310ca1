"""One SAE encoder on a torch device, whatever file format it came from.

Every format (SAELens, SAELens transcoders, EleutherAI sparsify) is read into the same weights,
in SAELens' orientation: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_out]`,
`b_dec` ([d_in] for an SAE, [d_out] for a transcoder, where it is never subtracted from the input).

    x' = norm(x * input_scale) - b_dec * apply_b_dec_to_input
    pre = x' @ W_enc + b_enc
    standard (ReLU): relu(pre)       TopK: relu of the k largest of pre, 0 elsewhere
    (TopK with rescale_acts_by_decoder_norm: pre * ||W_dec[i]|| first, as SAELens 6 does)
    JumpReLU: relu(pre) * (pre > threshold)
    groupmax (sparsify): relu(pre) cut into k equal groups, the largest of each group kept
    gated: (x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc * exp(r_mag)) + b_mag)

relu-then-top-k (sparsify) and top-k-then-relu (SAELens) give the same dense latents: relu is
monotone, and where they could pick different indices the value is 0 either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featurescribe.errors import FeaturescribeError

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "groupmax")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")  # of the input, done in _prepare
_TENSORS = ("W_enc", "W_dec", "b_dec", "b_enc", "threshold", "b_gate", "r_mag", "b_mag", "dec_norm")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str  # one of ARCHITECTURES
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False  # TopK: select on pre * ||W_dec row||
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    input_scale: float | None = None  # SAELens' activation_scaler.json: the input times this, in training
    hook_name: str | None = None
    hook_layer: int | None = None
    model_name: str | None = None
    dtype: str = "float32"
    format: str = "saelens"  # saelens | sparsify
    transcoder: bool = False  # reads a module's input and predicts its output
    d_out: int | None = None  # a transcoder's output width (None: d_in)
    hook_name_out: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _required(cfg: SAEConfig) -> list[str]:
    if cfg.architecture == "gated":
        return ["W_enc", "b_dec", "b_gate", "r_mag", "b_mag"]
    return (["W_enc", "b_enc"] + (["b_dec"] if cfg.apply_b_dec_to_input else [])
            + (["W_dec"] if cfg.rescale_acts_by_decoder_norm else []))


def _check_shapes(cfg: SAEConfig, w: dict, path: str, weights_file: str) -> None:
    expect = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
              "W_dec": (cfg.d_sae, cfg.d_out or cfg.d_in), "b_dec": (cfg.d_out or cfg.d_in,),
              "threshold": (cfg.d_sae,)}
    for name, shape in expect.items():
        if name in w and tuple(w[name].shape) != shape:
            raise FeaturescribeError(f"SAE {path}: {weights_file}: {name} has shape {tuple(w[name].shape)}, "
                                     f"expected {list(shape)} (d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                                     + (f", d_out={cfg.d_out}" if cfg.d_out else "") + ")")


class SAE:
    """An SAE's (or transcoder's) encoder. `encode(x)` maps [..., d_in] -> [..., d_sae]."""

    def __init__(self, cfg: SAEConfig, weights: dict, path: str = "", weights_file: str = "weights"):
        import torch

        self.cfg, self.path = cfg, path
        w = dict(weights)
        if "threshold" not in w and "log_threshold" in w:
            w["threshold"] = torch.exp(w["log_threshold"])
        missing = [n for n in _required(cfg) if n not in w]
        if cfg.architecture == "jumprelu" and "threshold" not in w:
            missing.append("threshold")
        if missing:
            raise FeaturescribeError(f"SAE {path}: {weights_file} lacks {', '.join(missing)}")
        _check_shapes(cfg, w, path, weights_file)
        for name in _TENSORS:
            setattr(self, name, w.get(name))  # W_dec is not needed to encode; the logit lens reads it
        if cfg.rescale_acts_by_decoder_norm:
            self.dec_norm = self.W_dec.norm(dim=-1)

    @property
    def width(self) -> int:
        return self.cfg.d_sae

    def to(self, device, dtype=None) -> "SAE":
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype or t.dtype))
        return self

    @property
    def dtype(self):
        return self.W_enc.dtype

    def decoder_row(self, i: int):
        """What latent i adds to the output per unit of its activation: W_dec[i], divided by its
        norm when the latents were rescaled by it (rescale_acts_by_decoder_norm), and by the input
        scale (SAELens' ActivationScaler.unscale undoes it on the output)."""
        row = self.W_dec[i]
        row = row / self.dec_norm[i] if self.dec_norm is not None else row
        return row / self.cfg.input_scale if self.cfg.input_scale is not None else row

    def _prepare(self, x):
        if self.cfg.input_scale is not None:  # before the cast, as SAELens' ActivationScaler.scale runs
            x = x * self.cfg.input_scale
        x = x.to(self.W_enc.dtype)
        norm = self.cfg.normalize_activations
        if norm == "constant_norm_rescale":
            x = x * (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
        elif norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x):
        import torch

        x = self._prepare(x)
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
        if arch == "groupmax":
            top = torch.relu(pre).unflatten(-1, (self.cfg.k, -1)).max(dim=-1)
            offsets = torch.arange(0, self.cfg.d_sae, self.cfg.d_sae // self.cfg.k, device=pre.device)
            return torch.zeros_like(pre).scatter_(-1, top.indices + offsets, top.values)
        if self.dec_norm is not None:
            pre = pre * self.dec_norm
        top = torch.topk(pre, k=self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
