# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
DEMO_DIR := results/demo
CLS := experiments/classification/run.py --preset tiny

.PHONY: venv demo demo-lm test test-all clean wheels

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The demo: a question precision decides, in two phases on an offline synthetic corpus (PLAN.md, "The demo task").
# It first says which low-precision dtypes this CPU computes natively: a config whose matmuls measure more than
# DEMO_MAX_SLOWDOWN times slower than fp32 here (torch's emulation) trains with its fp16/bf16 matmuls computed as
# fp32 ones rounded to the dtype (dtype_bench.cpu: the same numerics, about fp32's speed), compared on quality
# only; `make demo DEMO_EMULATE=false` records such configs as `skipped` instead, `DEMO_MAX_SLOWDOWN=none` runs
# them on torch's own kernels. Then one fp32 training of a 1-layer RoBERTa from scratch (cached: a second
# `make demo` reuses it), then DEMO_CONFIGS x DEMO_SEEDS fine-tune its best checkpoint at a fine-tuning learning
# rate, then the report.
DEMO_MAX_SLOWDOWN ?= 4
DEMO_EMULATE ?= true
DEMO_SEEDS ?= 3
DEMO_CONFIGS ?= fp32_baseline,amp_bf16,amp_bf16_fp32_head,amp_fp16,bf16_sr_fp32_moments,bf16_naive,fp16_naive
DEMO_CHECKPOINT = $(DEMO_DIR)/pretrain/checkpoints/*/best-step*/model.safetensors
demo: venv
	$(PY) -m dtype_bench.cpu --config $(DEMO_CONFIGS) --max_cpu_slowdown $(DEMO_MAX_SLOWDOWN) \
		--emulate_slow_matmuls $(DEMO_EMULATE)
	$(PY) experiments/classification/run.py --preset demo_pretrain --config fp32_baseline \
		--output_dir $(DEMO_DIR)/pretrain
	$(PY) experiments/classification/run.py --preset demo --config $(DEMO_CONFIGS) --seeds $(DEMO_SEEDS) \
		--init_weights "$$(ls $(DEMO_CHECKPOINT))" --max_cpu_slowdown $(DEMO_MAX_SLOWDOWN) \
		--emulate_slow_matmuls $(DEMO_EMULATE) \
		--output_dir $(DEMO_DIR)/classification
	$(PY) analysis/analyze_experiment.py --results_dir $(DEMO_DIR)/classification

# The language-modelling counterpart, its own report (in its results folder) and the cross-task comparison
# (longer than the demo).
demo-lm: demo
	$(PY) experiments/lm/run.py --preset tiny --config core --output_dir $(DEMO_DIR)/lm
	$(PY) analysis/analyze_experiment.py --results_dir $(DEMO_DIR)/lm
	$(PY) analysis/compare_experiments.py --lm_results $(DEMO_DIR)/lm --cls_results $(DEMO_DIR)/classification \
		--output_dir $(DEMO_DIR)/comparison

# The default tier (minutes): everything but the `slow` end-to-end tests; the 20 slowest are listed at the end.
test: venv
	$(PY) -m pytest -q -m "not slow" --durations=20

# Then the end-to-end tier: the real scripts in subprocesses, kill-and-resume, torchrun, submitit (CI runs both).
# pytest's exit 5 (no test selected: none is marked slow) is not a failure.
test-all: test
	$(PY) -m pytest -q -m slow --durations=20 || [ $$? -eq 5 ]

# The optional packages' wheels for an offline (GPU) machine, into wheels/ (needs PyPI; any Python with pip):
# benchmarks/gpu_check.py --wheels wheels installs them there (benchmarks/wheels.py install wheels alone).
WHEELS_PYTHON ?= 3.12
WHEELS_PLATFORM ?= manylinux_2_28_x86_64
wheels:
	$(PYTHON) benchmarks/wheels.py download wheels --python $(WHEELS_PYTHON) --platform $(WHEELS_PLATFORM)

clean:
	rm -rf $(VENV) results data
