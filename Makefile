# Set-up needs only python3. torch is installed first, pinned to the CPU wheel these machines
# carry; everything else is installed under constraints.txt so nothing upgrades it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint clean strip-notebooks

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check moxin tests run.py experiments

strip-notebooks: $(STAMP)  # outputs and execution counts out of the committed notebooks
	$(PY) notebooks/strip_outputs.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
