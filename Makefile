# bpt: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV       := .venv
PY         := $(VENV)/bin/python
BUILD_DIR  := build
JOBS       ?= $(shell nproc)
BENCH_OUT  := bench-results
export CCACHE_DIR ?= $(HOME)/.cache/ccache
# Precompiled headers need these for ccache to hit.
export CCACHE_SLOPPINESS := pch_defines,time_macros,include_file_mtime,include_file_ctime

.PHONY: help setup build build-cuda test test-cpp test-python demo bench clean

help:
	@echo "make demo   - install everything, build, train a small LLaMA on Debian's fortunes, generate text"
	@echo "make test   - build and run all tests (ctest + pytest)"
	@echo "make setup  - install Debian packages and the Python venv (.venv)"
	@echo "make build  - configure and build (Release) into $(BUILD_DIR)/"
	@echo "make bench  - run every tools/bench/*.py and print the table"
	@echo "make build-cuda - build against the CUDA torch (.venv-cuda) with the CUDA kernels and NCCL into build-cuda/ (no GPU needed; docs/cuda.md)"
	@echo "make clean  - remove $(BUILD_DIR)/"

setup:
	@bash tools/setup.sh

$(BUILD_DIR)/build.ninja: CMakeLists.txt
	@test -x $(PY) && $(PY) -c 'import torch' 2>/dev/null || \
	  { echo "error: no .venv with torch: run 'make setup' first" >&2; exit 2; }
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"

build: $(BUILD_DIR)/build.ninja
	cmake --build $(BUILD_DIR) -j $(JOBS)

test-cpp: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

test-python: build
	$(PY) -m pytest tests/python -q

# Both suites run even if the first fails; the target fails if either did.
test: build
	@status=0; \
	echo "== C++ tests (ctest)"; (cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)) || status=1; \
	echo "== Python tests (pytest)"; $(PY) -m pytest tests/python -q || status=1; \
	exit $$status

# The demo: the ops checked against ATen, then a small LLaMA trained on Debian's fortunes
# (tokenizer, training with a progress bar, checkpoints, a loss plot) and a sample generated.
DEMO := runs/demo
demo: setup build
	$(BUILD_DIR)/bpt-demo
	$(PY) tools/demo_corpus.py $(DEMO)
	$(BUILD_DIR)/bpt-tokenizer --input $(DEMO)/train.jsonl --vocab_size 2000 --output $(DEMO)/tokenizer
	$(BUILD_DIR)/bpt-train --config configs/llama/demo.toml --autoresume
	$(PY) tools/plot_metrics.py $(DEMO)/metrics.jsonl --out $(DEMO)/metrics.png
	$(BUILD_DIR)/bpt-generate --model $(DEMO)/checkpoint --prompt "The secret of life is" --max_new_tokens 80 \
	  --do_sample --temperature 0.8 --top_k 40 --seed 1

bench: build
	@mkdir -p $(BENCH_OUT)
	@for b in tools/bench/*.py; do \
	  name=$$(basename $$b .py); \
	  case $$name in report|common) continue;; esac; \
	  echo "== $$name"; $(PY) $$b $(BENCH_ARGS) --out $(BENCH_OUT)/$$name.json || exit 1; \
	done
	$(PY) tools/bench/report.py $(BENCH_OUT)/*.json

build-cuda:
	@bash tools/build_cuda.sh

clean:
	rm -rf $(BUILD_DIR)
