# Set-up on a fresh machine is part of both targets: `make demo`, `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-prune demo-calibrated test install bench bench-calibrated bench-synthetic bench-search bench-quantization bench-finetune bench-train-zoo clean

install: $(STAMP)

# docker/install.sh: torch==2.13.0 first (the local CPU build; anything that lets pip pick
# torch itself pulls several GB of CUDA packages), then the package, editable. The Docker
# images run the same script, so the two installs cannot drift.
$(STAMP): pyproject.toml
	PYTHON=$(PYTHON) bash docker/install.sh --venv $(VENV)
	touch $(STAMP)

# A short SAC search on an embedded local Ray, its export, and SAC against uniform and random
# search at the same budget (under 5 minutes on 2 cores, measured; see the README).
demo: $(STAMP)
	rm -rf out/runs/demo
	$(BIN)/autodfp search resnet20-quick --name demo --storage out/runs
	$(BIN)/autodfp export out/runs/demo --out out/demo-export --force
	$(BIN)/autodfp report out/runs/demo --compare

# The data-free core alone: ResNet-56, uniform keep 0.5, Neuron Merging.
demo-prune: $(STAMP)
	$(BIN)/autodfp prune --strategy examples/resnet56-uniform-keep0.5.json \
		--out out/demo-resnet56 --force

# The shipped calibrated SAC strategy: ResNet-56 at <= 50 % of the MACs, rebuilt from the
# weights alone (its 512 synthetic images are made on first use, 6-13 minutes, then cached).
demo-calibrated: $(STAMP)
	$(BIN)/autodfp prune --strategy examples/resnet56-sac-calibrated-macs0.5.json \
		--out out/demo-calibrated --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/baselines.py

bench-calibrated: $(STAMP)
	$(BIN)/python bench/baselines.py --calibrated

bench-synthetic: $(STAMP)
	$(BIN)/python bench/synthetic.py

bench-search: $(STAMP)
	$(BIN)/python bench/search.py

# ResNet-56 weights at 8/6/5/4/3 bits, unpruned and pruned, each compensation (lossless 1,017;
# add `--splits test-lossless,test-jpeg` for the JPEG 10,000: about 2 minutes a row on 2 cores)
bench-quantization: $(STAMP)
	$(BIN)/python bench/quantization.py --splits test-lossless

# Recovery after the data-free prune: ResNet-20 at <= 50 % of the MACs, 1 epoch of each method
# on the CIFAR-10 training JPEGs (about 40 minutes on 2 cores)
bench-finetune: $(STAMP)
	$(BIN)/python bench/finetune.py --model resnet20 --epochs 1

# VGG-16-BN and MobileNetV2 for CIFAR-10, 30 epochs each (minutes on one GPU; hours on 2 cores)
bench-train-zoo: $(STAMP)
	$(BIN)/python bench/train_zoo.py --models vgg16_bn,mobilenetv2 --epochs 30

clean:
	rm -rf $(VENV) out
