"""`make bench`: run every benchmark, print their headline figures, and record them in BENCHMARKS.md.

Each benchmark prints its headline figure as its last line, `name: value`. The table between the
markers in BENCHMARKS.md is rewritten with the machine, the command and the figures of this run.

    python benchmarks/run_all.py            # the --quick size of each (about 3 minutes on 2 idle cores)
    python benchmarks/run_all.py --full     # the full sizes
    python benchmarks/run_all.py --only harvest,sampling
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["harvest", "sae_encode", "sampling", "llm_throughput", "flow_overhead", "label_scale", "simulation",
           "quality", "cost", "steer", "search", "concurrency"]
START, END = "<!-- bench:auto -->", "<!-- /bench:auto -->"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", GPU " + torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="full sizes instead of --quick")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    names = [n for n in BENCHES if not args.only or n in args.only.split(",")]
    rows = []
    for name in names:
        script = ROOT / "benchmarks" / f"{name}.py"
        if not script.exists():
            print(f"{name}: (no benchmark file)", flush=True)
            continue
        cmd = [sys.executable, str(script.relative_to(ROOT))] + ([] if args.full else ["--quick"])
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        took = time.monotonic() - t0
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stdout.write(proc.stderr[-3000:])
        lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
        headline = lines[-1] if lines and re.match(r"^[a-z_0-9]+: ", lines[-1]) else "(failed)"
        # every `name: value` line of the output is a figure worth keeping
        figures = [l for l in lines if re.match(r"^[a-z_0-9]+: \S", l)]
        rows.append((name, "python " + " ".join(cmd[1:]), headline, figures, took, proc.returncode))
    print()
    for name, _, headline, _, took, rc in rows:
        print(f"{headline}    ({name}, {took:.0f} s{', FAILED' if rc else ''})")
    if args.no_write or not rows:
        return 0 if all(r[5] == 0 for r in rows) else 1
    today = dt.date.today().isoformat()
    block = [START, f"Last `make bench` ({'full' if args.full else 'quick'} sizes), {today}, on {machine()}.", "",
             "| benchmark | command | figures | seconds |", "|---|---|---|---|"]
    for name, cmd, headline, figures, took, rc in rows:
        figs = "<br>".join(f"`{f}`" for f in figures) or f"`{headline}`"
        block.append(f"| {name} | `{cmd}` | {figs}{' (FAILED)' if rc else ''} | {took:.0f} |")
    block.append(END)
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    pre, rest = text.split(START, 1)
    post = rest.split(END, 1)[1] if END in rest else ""
    path.write_text(pre + "\n".join(block) + post)
    print(f"wrote {path}")
    return 0 if all(r[5] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
