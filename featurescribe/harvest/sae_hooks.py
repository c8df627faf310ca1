"""The hook an SAE's config names -> the harvest site and layer it reads.

TransformerLens names (SAELens), Hugging Face module paths with our `.input` / `.output` suffix
(`model.layers.6.mlp.down_proj.input`), and sparsify hookpoints (module paths relative to the
model's `base_model`: `layers.6`, `layers.6.mlp`; `.input` added for a transcoder, which reads the
module's input). A layer of -1 means the token embeddings (before layer 0), which no site reads.
"""

from __future__ import annotations

import re

_LAYER = r"^(?:[a-z_]+\.)*(?:layers|h)\.(\d+)"  # model.layers.6, layers.6, transformer.h.6, ...
_ATTN = r"(?:self_attn|attn|attention)"
_HOOK_PATTERNS = [
    (r"^blocks\.(\d+)\.hook_resid_post$", "resid", 0),
    (r"^blocks\.(\d+)\.hook_resid_pre$", "resid", -1),
    (r"^blocks\.(\d+)\.hook_mlp_out$", "mlp_out", 0),
    (r"^blocks\.(\d+)\.mlp\.hook_post$", "mlp", 0),
    (r"^blocks\.(\d+)\.hook_attn_out$", "attn", 0),
    (r"^blocks\.(\d+)\.(?:ln2\.hook_normalized|mlp\.hook_in)$", "mlp_in", 0),
    (_LAYER + r"(?:\.output)?$", "resid", 0),
    (_LAYER + r"\.input$", "resid", -1),
    (_LAYER + r"\.mlp\.(?:down_proj|c_proj|fc2|dense_4h_to_h)\.input$", "mlp", 0),
    (_LAYER + r"\.mlp\.input$", "mlp_in", 0),
    (_LAYER + r"\.mlp(?:\.output)?$", "mlp_out", 0),
    (_LAYER + r"\.post_feedforward_layernorm(?:\.output)?$", "mlp_out_normed", 0),  # Gemma 2/3 only
    (_LAYER + r"\." + _ATTN + r"(?:\.(?:o_proj|c_proj|dense|out_proj))?(?:\.output)?$", "attn", 0),
]
_COMPILED = [(re.compile(p), site, shift) for p, site, shift in _HOOK_PATTERNS]
_TL_SUBLAYER_OUT = re.compile(r"^blocks\.\d+\.hook_(?:mlp|attn)_out$")
_TRANSFORMER_LENS = re.compile(r"^blocks\.\d+\.")  # hook_z, hook_resid_mid, hook_mlp_in, ...: known tensors


def names_another_tensor(hook_name: str | None) -> bool:
    """True for a TransformerLens hook that `site_of_hook` does not map: a named tensor no site
    reads (reading a site there instead would encode another tensor)."""
    return bool(hook_name) and site_of_hook(hook_name) is None and bool(_TRANSFORMER_LENS.match(hook_name))


def site_of_hook(hook_name: str | None) -> tuple[str, int] | None:
    """(site, layer) for a known SAE hook name, None for one we cannot read."""
    if not hook_name:
        return None
    for pat, site, shift in _COMPILED:
        m = pat.match(hook_name)
        if m:
            return site, int(m.group(1)) + shift
    return None


def after_post_norm(hook_name: str | None) -> bool:
    """True for TransformerLens's hook_mlp_out / hook_attn_out: in a block with post-norms (Gemma
    2/3) they are the normed outputs, not the sublayers' own (sites.POST_NORM_SITES)."""
    return bool(hook_name) and bool(_TL_SUBLAYER_OUT.match(hook_name))
