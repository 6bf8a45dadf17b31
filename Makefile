# Two set-up commands for a fresh machine: `make demo` and `make test`.
# TORCH_SPEC lets CI / dev venvs take the CPU build of torch that lies on disk; users get the normal build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
OUT ?= outputs/demo

.PHONY: install demo test lint results bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m hf_ddlr.demo --output_dir $(OUT)

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -x $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples scripts

results: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) scripts/make_results.py

bench: install
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) outputs
