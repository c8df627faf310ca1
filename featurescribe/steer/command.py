"""`featurescribe steer`: continuations of prompts with one feature steered, beside unsteered ones.

Reads the source (model, site, layer, SAE) from the database, loads its model, and generates
for every prompt one unsteered continuation and one per `--strength`, all in one batch. Writes
nothing. Strength is in multiples of the feature's max activation (see steer/source.py).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
from pathlib import Path

from featurescribe.errors import FeaturescribeError
from featurescribe.options import check_seed
from featurescribe.store.connection import DEFAULT_DB

DEFAULT_STRENGTH = 4.0
DEFAULT_MAX_NEW_TOKENS = 24


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default: {DEFAULT_DB})")
    p.add_argument("--source", required=True, help="source id, e.g. 6-mlp (harvest prints it)")
    p.add_argument("--feature", required=True, help="the feature (neuron or SAE latent) to steer")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to continue (repeatable)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line (added to --prompt)")
    p.add_argument("--strength", action="append", default=[],
                   help="multiples of the feature's max activation: a neuron is clamped to it, an SAE "
                        f"latent's decoder row is added at it (repeatable; default {DEFAULT_STRENGTH:g}; "
                        "0 ablates a neuron, negative values push the other way)")
    p.add_argument("--max-new-tokens", default=str(DEFAULT_MAX_NEW_TOKENS),
                   help=f"tokens to generate per continuation (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--seed", default="0", help="sampling seed: the same seed gives the same text (default 0)")
    p.add_argument("--temperature", default="0.7", help="sampling temperature; 0 is greedy (default 0.7)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): CUDA when torch sees a GPU, else the CPU")
    p.add_argument("--format", default="text", choices=["text", "json"],
                   help="text: columns side by side (default); json: one object")


def _number(name: str, text: str, kind=float, low: float | None = None) -> float:
    try:
        value = kind(str(text).strip())
    except ValueError:
        raise FeaturescribeError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {text!r}") from None
    if not math.isfinite(value) or (low is not None and value < low):
        raise FeaturescribeError(f"{name} must be a finite number{f' of at least {low:g}' if low is not None else ''}, "
                                 f"not {text!r}")
    return value


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise FeaturescribeError(f"--prompt-file {args.prompt_file}: {what}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FeaturescribeError(f"--prompt-file {args.prompt_file}: not UTF-8 text (one prompt per line)") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise FeaturescribeError("give at least one non-empty --prompt (or a --prompt-file)")
    return prompts


def parse_options(args) -> dict:
    """The checked options (one clear error for the first bad one)."""
    return {
        "feature": int(_number("--feature", args.feature, int, 0)),
        "strengths": [_number("--strength", s) for s in (args.strength or [str(DEFAULT_STRENGTH)])],
        "max_new_tokens": int(_number("--max-new-tokens", args.max_new_tokens, int, 1)),
        "seed": check_seed(int(_number("--seed", args.seed, int, 0))),
        "temperature": _number("--temperature", args.temperature, float, 0),
        "prompts": _prompts(args),
    }


def steer_feature(db: str, source_id: str, feature: int, prompts: list[str], strengths: list[float], *,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, temperature: float = 0.7,
                  device: str = "auto") -> dict:
    """{'source', 'feature', 'max_act', 'hook', 'mode', 'rows': [{prompt, unsteered, steered: {s: text}}],
    'kl': {s: next-token KL}} — the `steer` command's result, reading the database only."""
    from featurescribe.steer.calibrate import mean_kl
    from featurescribe.steer.source import load_source_steering
    from featurescribe.store.connection import open_db
    from featurescribe.store.harvest_rows import refuse_unfinished
    from featurescribe.store.steering import feature_max_act, source_row

    con = open_db(db, read_only=True, create=False)
    try:
        source = source_row(con, source_id)
        refuse_unfinished(con, [source_id])  # its max activations, the strengths' unit, are written last
        max_act = feature_max_act(con, source, feature)
    finally:
        con.close()
    st = load_source_steering(source, device=device)
    iv = st.intervention(feature, max_act)
    n = len(prompts)
    rows = prompts * (len(strengths) + 1)
    row_strengths = [None] * n + [s for s in strengths for _ in range(n)]
    with st.local.lock:
        texts = st.steerer.generate(rows, iv, row_strengths, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=seed)
        kls = mean_kl(st.steerer, prompts, iv, strengths)
    out_rows = [{"prompt": p, "unsteered": texts[i],
                 "steered": {f"{s:g}": texts[n * (j + 1) + i] for j, s in enumerate(strengths)}}
                for i, p in enumerate(prompts)]
    return {"source": source_id, "feature": feature, "max_act": max_act, "hook": st.point.name,
            "mode": iv.mode, "scale": iv.scale, "rows": out_rows,
            "kl": {f"{s:g}": round(k, 4) for s, k in zip(strengths, kls)}}


def _columns(cells: list[str], width: int) -> list[str]:
    gap = " | "
    col = max(12, (width - len(gap) * (len(cells) - 1)) // len(cells))
    wrapped = [textwrap.wrap(c.replace("\n", "\u21b5 "), col) or [""] for c in cells]
    height = max(len(w) for w in wrapped)
    return [gap.join((w[i] if i < len(w) else "").ljust(col) for w in wrapped).rstrip() for i in range(height)]


def print_text(result: dict) -> None:
    width = shutil.get_terminal_size((120, 24)).columns
    what = "clamped to" if result["mode"] == "clamp" else "decoder row added at"
    max_act = "none recorded" if result["max_act"] is None else f"{result['max_act']:.4g}"
    print(f"source {result['source']} feature {result['feature']} at {result['hook']}: {what} strength x "
          f"{result['scale']:.4g} (max activation {max_act})")
    strengths = list(result["kl"])
    for row in result["rows"]:
        print(f"\nprompt: {row['prompt']!r}")
        heads = ["unsteered"] + [f"strength {s} (next-token KL {result['kl'][s]:.2f})" for s in strengths]
        for line in _columns(heads, width) + _columns(["-" * 9] * len(heads), width):
            print(line)
        for line in _columns([row["unsteered"]] + [row["steered"][s] for s in strengths], width):
            print(line)


def run(args: argparse.Namespace) -> int:
    opts = parse_options(args)
    result = steer_feature(args.db, args.source, opts["feature"], opts["prompts"], opts["strengths"],
                           max_new_tokens=opts["max_new_tokens"], seed=opts["seed"],
                           temperature=opts["temperature"], device=args.device)
    if args.format == "json":
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_text(result)
    return 0
