# Set-up on a fresh machine is part of both targets: `make demo`, `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

install: $(STAMP)

# torch==2.13.0 first: the local CPU build. Anything that lets pip pick torch itself pulls
# several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/autodfp prune --strategy examples/resnet56-uniform-keep0.5.json \
		--out out/demo-resnet56 --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/baselines.py

clean:
	rm -rf $(VENV) out
