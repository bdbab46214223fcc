# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := true
DEMO_DIR := results/demo

.PHONY: venv demo test test-fast clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) experiments/classification/run.py --preset tiny --config core --output_dir $(DEMO_DIR)/classification

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results data
