"""Output-side evidence for explainers: the tokens a feature's output direction promotes most.

A feature writes along a direction of the model's hidden space: an MLP neuron along its column of
the MLP's down projection, an SAE latent along its decoder row, a residual-stream or
attention-output unit along its own basis vector. Read through the model's final norm and its
unembedding (the "logit lens"), the direction gives a score to every token of the vocabulary; the
highest-scoring tokens say what the feature pushes the next token towards. They are a hint next to
the activating examples, strongest for features of late layers.

`promoted_tokens(source, feature_ids, k)` computes them for a `sources` row, loading the source's
model (and SAE) once per process.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from featurescribe.errors import FeaturescribeError

_LOADED: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _model(model_id: str):
    from featurescribe.harvest.models import load_causal_lm

    with _LOCK:
        key = ("model", model_id)
        if key not in _LOADED:
            try:
                _LOADED[key] = load_causal_lm(model_id, device="cpu")
            except FeaturescribeError as err:
                raise FeaturescribeError(f"--logit-lens needs the source's model: {err}") from None
        return _LOADED[key]


def register_model(model_id: str, model, tokenizer) -> None:
    """Use an already loaded (model, tokenizer) for `model_id` (tests share one load)."""
    with _LOCK:
        _LOADED[("model", model_id)] = (model, tokenizer)


def _sae(path: str):
    from featurescribe.harvest.sae import load_sae

    with _LOCK:
        key = ("sae", path)
        if key not in _LOADED:
            _LOADED[key] = load_sae(path, device="cpu")
        return _LOADED[key]


def output_directions(model, site: str, layer: int, feature_ids: Sequence[int], sae=None):
    """[n, d_model]: the direction each feature writes along (see the module docstring)."""
    import torch

    from featurescribe.harvest.sites import _DOWN_NAMES, _MLP_NAMES, _child, decoder_layers

    ids = torch.as_tensor(list(feature_ids), dtype=torch.long)
    if sae is not None:
        if getattr(sae, "W_dec", None) is None:
            raise FeaturescribeError(f"--logit-lens needs the SAE's decoder, and {sae.path} has no W_dec")
        return sae.W_dec.detach().float()[ids]
    d_model = model.get_output_embeddings().weight.shape[1]
    if site == "mlp":
        path, layers = decoder_layers(model)
        where = f"{path}.{layer}"
        mn, mlp = _child(layers[layer], _MLP_NAMES, "MLP", where)
        _, down = _child(mlp, _DOWN_NAMES, "MLP down projection", f"{where}.{mn}")
        w = down.weight.detach().float()
        # nn.Linear keeps [out, in] (a neuron is a column); GPT-2's Conv1D keeps [in, out] (a row)
        return w[ids] if w.shape[0] != d_model else w[:, ids].T
    if site in ("resid", "attn", "mlp_out", "mlp_in"):
        return torch.eye(d_model)[ids]
    raise FeaturescribeError(f"--logit-lens does not know the output direction of site {site!r}")


def _final_norm(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (decoder, getattr(model, "transformer", None), getattr(model, "model", None)):
        for name in ("norm", "ln_f", "final_layernorm"):
            mod = getattr(owner, name, None) if owner is not None else None
            if mod is not None:
                return mod
    return None


def top_promoted(model, tokenizer, directions, k: int = 10) -> list[list[str]]:
    """The `k` tokens whose unembedding scores highest on each direction (after the final norm)."""
    import torch

    unembed = model.get_output_embeddings()
    norm = _final_norm(model)
    with torch.inference_mode():
        d = directions.to(unembed.weight.device, unembed.weight.dtype)
        if norm is not None:
            d = norm(d)
        logits = unembed(d).float()
        top = torch.topk(logits, k, dim=-1).indices.tolist()
    return [[tokenizer.decode([t]) for t in row] for row in top]


def promoted_tokens(source: dict, feature_ids: Sequence[int], k: int = 10) -> dict[int, list[str]]:
    """{feature: its k most promoted tokens} for a `sources` row (model_id, site, layer, sae_path)."""
    if not feature_ids:
        return {}
    model, tokenizer = _model(source["model_id"])
    sae = _sae(source["sae_path"]) if source.get("sae_path") else None
    site = source.get("site") or "mlp"
    directions = output_directions(model, site, int(source["layer"]), feature_ids, sae)
    return dict(zip((int(f) for f in feature_ids), top_promoted(model, tokenizer, directions, k)))
