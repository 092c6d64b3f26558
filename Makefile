# Two entry points for a fresh CPU machine (see README): `make demo` and `make test`.
PYTHON ?= python
# The CPU build of torch is installed by exact version so pip never pulls the multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench

install:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) recipes/pretrain_demo.py

test: install
	$(PYTHON) -m pytest -q tests

lint:
	ruff check .

# Appends rows to benchmarks/results/*.jsonl (full shapes on a GPU, tiny labelled CPU shapes otherwise).
bench: install
	for script in masking attention rel_pos_bias masked_lm_loss block train; do \
		$(PYTHON) benchmarks/bench_$$script.py || exit 1; done
