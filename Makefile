# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
DEMO_DIR := results/demo
CLS := experiments/classification/run.py --preset tiny

.PHONY: venv demo demo-lm test clean wheels

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The core configs (fp32_baseline, amp_fp16, amp_bf16, bf16_sr_fp32_moments) on the offline tiny preset, then the report.
# First it prints what it will run on this machine and roughly how long (--plan: each config that trains is
# calibrated with a few steps): a config whose fp16/bf16 matmuls measure more than DEMO_MAX_SLOWDOWN times slower
# than fp32 here (emulated, e.g. fp16 on most AMD/older Intel CPUs) is recorded as `skipped` with the measured
# factor instead of taking half an hour; `make demo DEMO_MAX_SLOWDOWN=none` runs everything.
DEMO_MAX_SLOWDOWN ?= 4
demo: venv
	$(PY) $(CLS) --config core --max_cpu_slowdown $(DEMO_MAX_SLOWDOWN) --output_dir $(DEMO_DIR)/classification --plan
	$(PY) $(CLS) --config core --max_cpu_slowdown $(DEMO_MAX_SLOWDOWN) --output_dir $(DEMO_DIR)/classification
	$(PY) analysis/analyze_experiment.py --results_dir $(DEMO_DIR)/classification

# The language-modelling counterpart and the cross-task comparison (longer than the demo).
demo-lm: demo
	$(PY) experiments/lm/run.py --preset tiny --config core --output_dir $(DEMO_DIR)/lm
	$(PY) analysis/compare_experiments.py --lm_results $(DEMO_DIR)/lm --cls_results $(DEMO_DIR)/classification \
		--output_dir $(DEMO_DIR)/comparison

test: venv
	$(PY) -m pytest -q

# The optional packages' wheels for an offline (GPU) machine, into wheels/ (needs PyPI; any Python with pip):
# benchmarks/gpu_check.py --wheels wheels installs them there (benchmarks/wheels.py install wheels alone).
WHEELS_PYTHON ?= 3.12
WHEELS_PLATFORM ?= manylinux_2_28_x86_64
wheels:
	$(PYTHON) benchmarks/wheels.py download wheels --python $(WHEELS_PYTHON) --platform $(WHEELS_PLATFORM)

clean:
	rm -rf $(VENV) results data
