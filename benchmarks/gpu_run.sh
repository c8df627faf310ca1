#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, from the checkout's root, with .whl/ and gpu-model/ carried
# (benchmarks/gpu_prepare.sh writes them): installs the wheels beside the image's own packages,
# records the machine, then runs the GPU harvest benchmark. Every line also goes to $OUT, so what
# ran before a time-out still comes back. BENCH_ARGS replaces the benchmark's arguments; AGAIN_ARGS
# those of the second, shorter run (empty: none).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-out}
BENCH_ARGS=${BENCH_ARGS:---gpu --quick --model gpu-model --skip-one-by-one}
mkdir -p "$OUT"
if ! ls .whl/*.whl > /dev/null 2>&1 || [ ! -f gpu-model/config.json ]; then
    echo "gpu_run.sh: .whl/ or gpu-model/ is missing: run benchmarks/gpu_prepare.sh where PyPI is reachable, and carry both" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fs-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/fs-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    echo "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
    "$PY" -c 'import sys, torch, transformers, duckdb, pyarrow, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "duckdb", duckdb.__version__, "pyarrow", pyarrow.__version__, "numpy", numpy.__version__)'
} 2>&1 | tee "$OUT/machine.txt"
LIMIT_S=${LIMIT_S:-570}  # inside the device command's 600 s, so that the script ends on its own
# shellcheck disable=SC2086  # BENCH_ARGS and AGAIN_ARGS are lists of words
timeout $((LIMIT_S - SECONDS)) "$PY" benchmarks/harvest.py $BENCH_ARGS 2>&1 | tee "$OUT/harvest-gpu.log"
status=${PIPESTATUS[0]}
# with time left: the speed test again with more writer threads, so that one lease also tells
# whether the writers hold the harvest back on this machine
AGAIN_ARGS=${AGAIN_ARGS-$BENCH_ARGS --only speed --writer-threads 4}
if [ "$status" -eq 0 ] && [ -n "$AGAIN_ARGS" ] && [ $((LIMIT_S - SECONDS)) -gt 150 ]; then
    echo "--- again, $((LIMIT_S - SECONDS)) s left: $AGAIN_ARGS"
    timeout $((LIMIT_S - SECONDS)) "$PY" benchmarks/harvest.py $AGAIN_ARGS 2>&1 | tee "$OUT/harvest-gpu-again.log"
fi
exit "$status"
