# `make demo` and `make test` work on a fresh clone: they create .venv when it is missing and reuse it after.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test lint venv clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(INSTALLED)

venv: $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check hf_captioner tests

test: lint
	$(OFFLINE) $(PYTHON) -m pytest -q

demo: $(INSTALLED)
	$(OFFLINE) $(VENV)/bin/hf-captioner demo

clean:
	rm -rf runs .pytest_cache .ruff_cache
