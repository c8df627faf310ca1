"""Where activations are read: a site of one decoder layer, and a forward pass that stops there.

Sites of layer L (0-based):

| site      | what                                              | hook_name (HF module path + .input/.output) |
|-----------|---------------------------------------------------|---------------------------------------------|
| `mlp`     | the MLP's hidden neurons: the input of its down   | `model.layers.L.mlp.down_proj.input`        |
|           | projection (act(gate) * up in gated MLPs)         |                                             |
| `resid`   | the residual stream after layer L                 | `model.layers.L.output`                     |
| `attn`    | the attention block's output (output projection)  | `model.layers.L.self_attn.o_proj.output`    |
| `mlp_out` | the MLP block's output (down projection output)   | `model.layers.L.mlp.output`                 |
| `mlp_in`  | the MLP block's input (the residual stream after  | `model.layers.L.mlp.input`                  |
|           | the pre-MLP norm): what a transcoder reads        |                                             |

(Module paths are those of the model at hand; the examples are Llama/Gemma names.) The forward pass
runs the model's backbone only up to the hooked module: a hook captures the tensor and raises, so no
later layer and no LM head runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from featurescribe.errors import FeaturescribeError

SITES = ("mlp", "resid", "attn", "mlp_out", "mlp_in")
# Neuronpedia-style set names used in source ids: 6-mlp, 6-res, 6-att, 6-mlpout, 6-mlpin
SITE_ABBR = {"mlp": "mlp", "resid": "res", "attn": "att", "mlp_out": "mlpout", "mlp_in": "mlpin"}

_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out", "wo")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo")


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the site."""


@dataclass
class Site:
    site: str
    layer: int
    module_name: str  # e.g. model.layers.6.mlp.down_proj
    io: str  # 'input' | 'output'
    width: int
    n_layers: int

    @property
    def hook_name(self) -> str:
        return f"{self.module_name}.{self.io}"


def decoder_layers(model):
    """(path, ModuleList) of the model's decoder layers."""
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise FeaturescribeError(f"cannot find the decoder layers of {type(model).__name__}")


def _child(module, names, what, where):
    for n in names:
        sub = getattr(module, n, None)
        if sub is not None:
            return n, sub
    raise FeaturescribeError(f"cannot find the {what} in {where} ({type(module).__name__}); "
                             f"looked for {', '.join(names)}")


def check_site(site: str) -> str:
    if site not in SITES:
        raise FeaturescribeError(f"unknown site {site!r}: use one of {', '.join(SITES)}")
    return site


class SiteReader:
    """Runs a model up to one site and returns the activations there, [batch, seq, width]."""

    def __init__(self, model, site: str, layer: int):
        check_site(site)
        self.model = model
        path, layers = decoder_layers(model)
        n = len(layers)
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise FeaturescribeError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1})")
        block = layers[layer]
        where = f"{path}.{layer}"
        if site == "resid":
            name, module, io = where, block, "output"
        elif site == "attn":
            an, attn = _child(block, _ATTN_NAMES, "attention block", where)
            on, module = _child(attn, _OUT_NAMES, "attention output projection", f"{where}.{an}")
            name, io = f"{where}.{an}.{on}", "output"
        else:
            mn, mlp = _child(block, _MLP_NAMES, "MLP", where)
            if site in ("mlp_out", "mlp_in"):
                name, module, io = f"{where}.{mn}", mlp, "output" if site == "mlp_out" else "input"
            else:
                dn, module = _child(mlp, _DOWN_NAMES, "MLP down projection", f"{where}.{mn}")
                name, io = f"{where}.{mn}.{dn}", "input"
        self.module, self._io, self._box = module, io, []
        self.backbone = getattr(model, "base_model", model)
        width = self.run(self._probe_ids()).shape[-1]
        self.site = Site(site, layer, name, io, int(width), n)

    def _probe_ids(self):
        import torch

        return torch.tensor([[0, 1]], device=next(self.model.parameters()).device)

    def _pre_hook(self, module, args):
        self._box.append(args[0])
        raise _Stop

    def _post_hook(self, module, args, output):
        self._box.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    def run(self, input_ids):
        """Activations at the site for `input_ids` [batch, seq] (right padding needs no mask)."""
        import torch

        self._box.clear()
        # the hook lives only during this call, so the model is left as it was found
        if self._io == "input":
            handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            handle = self.module.register_forward_hook(self._post_hook)
        try:
            with torch.inference_mode():
                self.backbone(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not self._box:
            raise FeaturescribeError("the forward pass never reached the hooked module")
        out = self._box[0]
        self._box.clear()
        return out

