# Set-up needs only python3. torch is installed first, pinned to the CPU wheel these machines
# carry; everything else is installed under constraints.txt so nothing upgrades it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
COLOSSALAI_STAMP := $(VENV)/.colossalai
TORCH  := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-colossalai demo test lint clean strip-notebooks

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Colossal-AI 0.5.0 pins torch<=2.5.1 and transformers 4.51.3: installed without its dependencies,
# then the modules it imports at run time. Its TorchDDPPlugin and HybridParallelPlugin (data and tensor
# parallel) run on this torch (hardware=colossalai_ddp / colossalai_hybrid); ZeRO and Gemini need CUDA.
install-colossalai: $(COLOSSALAI_STAMP)

$(COLOSSALAI_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps colossalai==0.5.0
	$(PY) -m pip install --quiet -c constraints.txt 'peft>=0.13' einops galore-torch==1.0
	touch $(COLOSSALAI_STAMP)

demo: $(STAMP)
	$(PY) run.py

test: $(STAMP) $(COLOSSALAI_STAMP)  # the suite runs the Colossal-AI strategy tests too
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check moxin tests run.py experiments

strip-notebooks: $(STAMP)  # outputs and execution counts out of the committed notebooks
	$(PY) notebooks/strip_outputs.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
