"""Where activations are read: sites of decoder layers, and a forward pass that stops after the last.

Sites of layer L (0-based), one entry each in `SITE_TABLE`:

| site      | what                                              | hook_name (HF module path + .input/.output) |
|-----------|---------------------------------------------------|---------------------------------------------|
| `mlp`     | the MLP's hidden neurons: the input of its down   | `model.layers.L.mlp.down_proj.input`        |
|           | projection (act(gate) * up in gated MLPs)         |                                             |
| `resid`   | the residual stream after layer L                 | `model.layers.L.output`                     |
| `attn`    | the attention block's output (output projection)  | `model.layers.L.self_attn.o_proj.output`    |
| `mlp_out` | the MLP block's output (down projection output)   | `model.layers.L.mlp.output`                 |
| `mlp_in`  | the MLP block's input (the residual stream after  | `model.layers.L.mlp.input`                  |
|           | the pre-MLP norm): what a transcoder reads        |                                             |
| `mlp_out_normed` | the MLP's output after the norm Gemma 2/3  | `model.layers.L.post_feedforward_layernorm.output` |
|           | blocks apply to it (TransformerLens hook_mlp_out) |                                             |
| `attn_normed` | the attention output after Gemma 2/3's post-  | `model.layers.L.post_attention_layernorm.output` |
|           | attention norm (TransformerLens hook_attn_out)    |                                             |

(Module paths are those of the model at hand; the examples are Llama/Gemma names.) One forward pass
reads every site asked for: a hook on each hooked module captures its tensor, and the hook that
completes the set raises, so no later layer and no LM head runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from featurescribe.errors import FeaturescribeError

_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out", "wo")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo")


class _Stop(Exception):
    """Raised by the capture hook that completes the set, to end the forward pass."""


class _GiveUp(Exception):
    """Raised at a layer's start when the caller no longer wants the pass (`run`'s `stop_if`)."""


def _child(module, names, what, where):
    for n in names:
        sub = getattr(module, n, None)
        if sub is not None:
            return n, sub
    raise FeaturescribeError(f"cannot find the {what} in {where} ({type(module).__name__}); "
                             f"looked for {', '.join(names)}")


def _block(block, where):
    return where, block


def _mlp(block, where):
    mn, mlp = _child(block, _MLP_NAMES, "MLP", where)
    return f"{where}.{mn}", mlp


def _mlp_down(block, where):
    name, mlp = _mlp(block, where)
    dn, down = _child(mlp, _DOWN_NAMES, "MLP down projection", name)
    return f"{name}.{dn}", down


def _attn_out(block, where):
    an, attn = _child(block, _ATTN_NAMES, "attention block", where)
    on, out = _child(attn, _OUT_NAMES, "attention output projection", f"{where}.{an}")
    return f"{where}.{an}.{on}", out


def has_post_norms(block) -> bool:
    """A block that normalises each sublayer's output before adding it to the residual stream
    (Gemma 2 and 3). Llama's `post_attention_layernorm` is its pre-MLP norm: the pre-feedforward
    norm beside it tells the two apart."""
    return all(getattr(block, n, None) is not None
               for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"))


def _post_norm(name: str) -> Callable:
    def locate(block, where):
        if not has_post_norms(block):
            raise FeaturescribeError(f"{where} ({type(block).__name__}) has no norm after its sublayers, as "
                                     f"Gemma 2 and 3 blocks have ({name}): use site mlp_out or attn")
        return f"{where}.{name}", getattr(block, name)
    return locate


@dataclass(frozen=True)
class SiteKind:
    """A kind of site: its source-id abbreviation, which module of a block, and its input or output."""

    name: str
    abbr: str  # Neuronpedia-style set name in source ids: 6-mlp, 6-res, 6-att, 6-mlpout
    locate: Callable  # (block, "model.layers.L") -> (module path, module)
    io: str  # 'input' | 'output'


SITE_TABLE: dict[str, SiteKind] = {k.name: k for k in (
    SiteKind("mlp", "mlp", _mlp_down, "input"),
    SiteKind("resid", "res", _block, "output"),
    SiteKind("attn", "att", _attn_out, "output"),
    SiteKind("mlp_out", "mlpout", _mlp, "output"),
    SiteKind("mlp_in", "mlpin", _mlp, "input"),
    SiteKind("mlp_out_normed", "mlpoutpost", _post_norm("post_feedforward_layernorm"), "output"),
    SiteKind("attn_normed", "attpost", _post_norm("post_attention_layernorm"), "output"),
)}
# TransformerLens takes hook_mlp_out / hook_attn_out after the post-norms where a block has them
POST_NORM_SITES = {"mlp_out": "mlp_out_normed", "attn": "attn_normed"}
SITES = tuple(SITE_TABLE)
SITE_ABBR = {k: v.abbr for k, v in SITE_TABLE.items()}


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


def n_layers(model) -> int:
    return len(decoder_layers(model)[1])


def check_site(site: str) -> str:
    if site not in SITE_TABLE:
        raise FeaturescribeError(f"unknown site {site!r}: use one of {', '.join(SITES)}")
    return site


def check_layer(layer: int, n: int) -> int:
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise FeaturescribeError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1})")
    return layer


def _static_width(model, module, io: str) -> int | None:
    """The last dimension of a hooked tensor, from the module's weights (a Linear's in/out features)
    or, for a block's or an MLP's input/output, the model's hidden size; None when neither tells."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features if io == "input" else module.out_features)
    if any(isinstance(m, torch.nn.Linear) for m in module.children()) or io == "output":
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        return int(hidden) if isinstance(hidden, int) else None
    return None


class MultiSiteReader:
    """Runs a model once and returns the activations at every site asked for: {(site, layer): [B, T, width]}."""

    def __init__(self, model, wanted: list[tuple[str, int]]):
        self.model = model
        path, layers = decoder_layers(model)
        n = len(layers)
        self.layers = layers
        self.hook_points: list[tuple[object, str, tuple[str, int]]] = []  # (module, io, key)
        places: dict[tuple[str, int], tuple[str, str]] = {}
        for site, layer in dict.fromkeys(wanted):
            kind = SITE_TABLE[check_site(site)]
            name, module = kind.locate(layers[check_layer(layer, n)], f"{path}.{layer}")
            self.hook_points.append((module, kind.io, (site, layer)))
            places[(site, layer)] = (name, kind.io)
        self.backbone = getattr(model, "base_model", model)
        self._box: dict = {}
        self._on_capture = None
        widths = {key: _static_width(model, module, io) for module, io, key in self.hook_points}
        if None in widths.values():  # a module whose width its weights do not say: one tiny forward pass
            probe = self.run(self._probe_ids())
            widths = {key: int(probe[key].shape[-1]) for key in places}
        self.sites = {key: Site(key[0], key[1], places[key][0], places[key][1], widths[key], n) for key in places}

    def _probe_ids(self):
        import torch

        return torch.tensor([[0, 1]], device=next(self.model.parameters()).device)

    def _capture(self, key, tensor):
        tensor = tensor[0] if isinstance(tensor, tuple) else tensor
        self._box[key] = tensor if self._on_capture is None else self._on_capture(key, tensor)
        if len(self._box) == len(self.hook_points):
            raise _Stop

    def _register(self):
        handles = []
        for module, io, key in self.hook_points:
            if io == "input":
                fn = (lambda k: lambda m, args: self._capture(k, args[0]))(key)
                handles.append(module.register_forward_pre_hook(fn))
            else:
                fn = (lambda k: lambda m, args, out: self._capture(k, out))(key)
                handles.append(module.register_forward_hook(fn))
        return handles

    def _give_up_hooks(self, stop_if: Callable[[], bool]) -> list:
        deepest = max(layer for _, layer in self.sites)

        def check(module, args):
            if stop_if():
                raise _GiveUp

        return [self.layers[i].register_forward_pre_hook(check) for i in range(deepest + 1)]

    def run(self, input_ids, on_capture=None, stop_if: Callable[[], bool] | None = None) -> dict | None:
        """Activations at every site for `input_ids` [batch, seq] (right padding needs no mask).

        `on_capture(key, tensor)`: called inside the forward pass as each site's activations are
        made; the dict then holds what it returns, and the activations can be freed at once
        instead of all living until the pass ends. `stop_if()`: asked at each layer's start; when
        it says True the pass ends there and `run` returns None."""
        import torch

        self._box, self._on_capture = {}, on_capture
        handles = self._register()  # the hooks live only during this call: the model is left as found
        if stop_if is not None:
            handles += self._give_up_hooks(stop_if)
        try:
            with torch.inference_mode():
                self.backbone(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        except _GiveUp:
            self._box = {}
            return None
        finally:
            for h in handles:
                h.remove()
        if len(self._box) != len(self.hook_points):
            raise FeaturescribeError("the forward pass never reached every hooked module")
        out, self._box = self._box, {}
        return out


class SiteReader:
    """Runs a model up to one site and returns the activations there, [batch, seq, width]."""

    def __init__(self, model, site: str, layer: int):
        self._multi = MultiSiteReader(model, [(site, layer)])
        self._key = (site, layer)
        self.site = self._multi.sites[self._key]
        self.module, self.io, _ = self._multi.hook_points[0]  # what steering hooks

    def run(self, input_ids):
        return self._multi.run(input_ids)[self._key]
