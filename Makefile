# Set-up and test entry points; README.md documents them. PYTHON is whatever environment you
# work in (a virtualenv is recommended). torch is pinned first so pip takes the CPU build on
# disk instead of pulling a multi-GB CUDA build through sentence-transformers; on a GPU host,
# install your own torch first and these targets keep it.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH = torch==2.13.0

.PHONY: install serve test-deps test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install .

serve: install
	$(PYTHON) -m stratacache.cli serve

test-deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install '.[test]'

# pytest exits 5 when it collects no tests: that is a failure here too (make fails on any
# non-zero exit).
test: test-deps
	$(PYTHON) -m pytest

bench:
	$(PYTHON) -m benchmarks.latency
