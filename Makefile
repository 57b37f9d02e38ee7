# Set-up and the two everyday commands.  `make train` and `make test` create
# .venv on first use (torch first, pinned to the CPU build this project is
# tested with; override with `make TORCH_SPEC=torch==2.x.y ...`).
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install train test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,onnx]"
	touch $@

train: install
	$(BIN)/gman train

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
