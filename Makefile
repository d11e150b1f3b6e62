# Two commands do everything on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC chooses the torch build: the default is the CPU wheel that this project's build
# machines carry; on a CUDA workstation use e.g. TORCH_SPEC='torch==2.13.0' with the CUDA index
# (see docs/install.md).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.freedeploy-installed
# Serving (Triton through PyTriton) lives in its own environment: PyTriton pins numpy<2, the rest of
# the toolchain (OpenCV, ...) wants numpy 2. It holds the runtime only: no torch.
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.freedeploy-installed
DEMO ?= demo-out

.PHONY: install serve-env demo test test-slow schema clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -e ".[serve]"
	touch $(SERVE_STAMP)

install: $(STAMP)

serve-env: $(SERVE_STAMP)

# The whole path on the built-in digits data: train FREE exits, export a validated bundle,
# certify thresholds on the validation split, evaluate on the test split, run a few predictions,
# and benchmark the bundle against its monolithic export.
demo: $(STAMP)
	$(BIN)/freedeploy train --model vit-tiny --data digits --exits 2,4,6 --out $(DEMO)/runs/digits --overwrite
	$(BIN)/freedeploy export $(DEMO)/runs/digits --target onnx --out $(DEMO)/bundles/digits --overwrite
	$(BIN)/freedeploy calibrate $(DEMO)/bundles/digits --split val --max-disagreement 0.01 --epsilon 0.05
	$(BIN)/freedeploy eval $(DEMO)/bundles/digits --split test
	$(BIN)/python examples/save_test_images.py $(DEMO)/bundles/digits $(DEMO)/images 8
	$(BIN)/python examples/predict.py $(DEMO)/bundles/digits $(DEMO)/images
	$(BIN)/freedeploy bench $(DEMO)/bundles/digits --batch 1,32

test: $(STAMP) $(SERVE_STAMP)
	FREEDEPLOY_SERVE_PYTHON=$(SERVE_VENV)/bin/python $(BIN)/python -m pytest -q

test-slow: $(STAMP) $(SERVE_STAMP)
	FREEDEPLOY_SERVE_PYTHON=$(SERVE_VENV)/bin/python $(BIN)/python -m pytest -q -m slow

# The published JSON Schemas of bundle.json, build.json and validation.json, from the dataclasses.
schema: $(STAMP)
	$(BIN)/python -c "from runtimes.published import schemas; from runtimes.schema import dump_schema; \
	[open('docs/schema/' + n, 'w').write(dump_schema(s)) for n, s in schemas().items()]"

clean:
	rm -rf $(DEMO) .pytest_cache
