# Targets a newcomer needs; see README.md.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
NPROC ?= 2

.PHONY: install test demo bench lint data

install:  ## torch first (a plain `torch` requirement would pull the multi-GB CUDA build), then the package
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)" || $(PYTHON) -m pip install -q torch
	$(PYTHON) -m pip install -q -e ".[dev,triton]"
	@# The SLURM tests start a one-node cluster from Debian's packages, and the signal test reads the
	@# workers' exit codes with strace (as root; the tests skip without them).
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s slurm-wlm munge strace >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge strace; fi

test:  ## the suite; tests/kernels runs beside the rest in a second process (see README, "Tests")
	@log=$$(mktemp); \
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=5 tests/kernels > $$log 2>&1 & kernels=$$!; trap 'kill $$kernels 2>/dev/null' INT TERM; \
	$(PYTHON) -m pytest -q --durations=15 --ignore=tests/kernels tests; rest=$$?; \
	wait $$kernels; status=$$?; echo "--- tests/kernels (run beside the rest):"; cat $$log; rm -f $$log; \
	[ $$rest = 0 ] && [ $$status = 0 ]

data:  ## the embedded default corpus from this machine's Python sources (skipped when already complete)
	$(PYTHON) scripts/build_corpus.py --out-dir data/corpus

demo: data
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) scripts/pretrain.py --config configs/tiny_moba.yaml

bench:
	$(PYTHON) scripts/bench_attention.py

lint:
	$(PYTHON) -m ruff check moba_train kernels scripts tests
