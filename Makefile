# Two entry points for a fresh CPU machine (see README): `make demo` and `make test`.
PYTHON ?= python
# torch is pinned to the version every test ran with; on the project's machines the package index serves its CPU
# build for this pin (elsewhere, add the CPU wheel index, e.g. TORCH="torch==2.13.0 --index-url .../whl/cpu").
TORCH ?= torch==2.13.0
# Detection (make test, make install-detection) needs torchvision, whose wheels on the index are built against the
# CUDA build of torch: next to the CPU build its ops do not load. `===` asks for the exact version string, i.e. the
# CUDA build (it also runs on a CPU) even where the index serves 2.13.0+cpu for ==2.13.0: a 2.6 GB download with its
# CUDA libraries (62 s to install here), against 190 MB for the CPU build that `make demo` keeps.
DETECTION_TORCH ?= torch===2.13.0 torchvision==0.28.0

.PHONY: install install-detection demo test test-all lint bench aot aot-oldest gpu-wheels gpu-check bench-pytest

# The install runs again only when what it depends on changed (or for another Python): a stamp per interpreter.
INSTALL_STAMP = build/.installed-$(shell $(PYTHON) -c "import sys, hashlib; print(hashlib.md5(sys.prefix.encode()).hexdigest()[:8])")
$(INSTALL_STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[test]"
	mkdir -p build && touch $@

install: $(INSTALL_STAMP)

DETECTION_STAMP = $(INSTALL_STAMP)-detection
$(DETECTION_STAMP): $(INSTALL_STAMP)
	$(PYTHON) -m pip install $(DETECTION_TORCH)
	$(PYTHON) -m pip install -e ".[test,detection]"
	touch $@

install-detection: $(DETECTION_STAMP)

demo: install
	$(PYTHON) recipes/pretrain_demo.py

# The default suite (~2 min of pytest on 2 cores): every module, long-running tests left out (`slow`); test-all runs them too.
test: install-detection
	$(PYTHON) -m pytest -q -m "not slow" tests

test-all: install-detection
	$(PYTHON) -m pytest -q tests

lint:
	ruff check .

# Appends rows to benchmarks/results/*.jsonl (full shapes on a GPU, tiny labelled CPU shapes otherwise).
bench: install
	for script in masking attention rel_pos_bias masked_lm_loss block train; do \
		$(PYTHON) benchmarks/bench_$$script.py || exit 1; done

# Compiles every Triton kernel for sm_80/sm_90 with the ptxas in Triton's wheel, no GPU needed (tools/aot/);
# fails on compile errors, shared-memory overflow and spilling configs. Writes build/aot/ (git-ignored); the committed
# tables are rewritten on purpose: make aot AOT_OUT=benchmarks/results/aot.
# AOT_SUBSET=full: every autotune config (long). aot-oldest: the same check under the oldest Triton we support (the
# GPU nodes' image has it), installed into a folder beside the tree (per Python version: the wheel is compiled) that
# shadows the installed Triton on PYTHONPATH; installed into a temporary folder first, so a broken install is redone.
AOT_SUBSET ?= ci
TRITON_OLDEST ?= 3.6.0
OLDEST_TRITON_DIR = $(CURDIR)/.triton-$(TRITON_OLDEST)-$(shell $(PYTHON) -c "import sys; print(sys.implementation.cache_tag)")
AOT_OUT ?= build/aot
aot:
	env -u TRITON_INTERPRET $(PYTHON) -m tools.aot --subset=$(AOT_SUBSET) --out=$(AOT_OUT)

aot-oldest:
	@test -d $(OLDEST_TRITON_DIR)/triton-$(TRITON_OLDEST).dist-info || { rm -rf $(OLDEST_TRITON_DIR).partial && \
		$(PYTHON) -m pip install -q --no-deps --target $(OLDEST_TRITON_DIR).partial triton==$(TRITON_OLDEST) && \
		rm -rf $(OLDEST_TRITON_DIR) && mv $(OLDEST_TRITON_DIR).partial $(OLDEST_TRITON_DIR); }
	PYTHONPATH=$(OLDEST_TRITON_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(MAKE) aot

# GPU validation on a bare node (benchmarks/README.md, "GPU validation on a bare node"); neither target runs `install`.
# gpu-wheels (here, with network): .whl/ (git-ignored) holds what the node lacks: DeepSpeed built without ops (pure
# Python), its dependencies missing there and simplejpeg (the workers' JPEG decoder), for CPython 3.12 on manylinux x86_64; .whl/COMMIT names the commit.
# gpu-check (there, no network): installs .whl/ into $(GPU_SITE) when DeepSpeed is not importable, then runs
# benchmarks/gpu_check.py into OUT (an OUT in the environment wins); DRY_RUN=1 is its CPU rehearsal (< 2 min).
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/site
GPU_WHEELS ?= .whl
GPU_WHEEL_PYTHON ?= 3.12
# OUT: where gpu_check writes (default: benchmarks/results/ for a GPU run, build/gpu-check-dry-run/ for a dry run)
OUT ?=
GPU_WHEEL_DEEPSPEED ?= deepspeed==0.19.8
GPU_WHEEL_DEPS ?= hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
	typing-inspection==0.4.2 typing-extensions==4.16.0 simplejpeg==1.8.2
GPU_WHEEL_PLATFORM = --only-binary=:all: --python-version $(GPU_WHEEL_PYTHON) --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_CHECK_PATH = PYTHONPATH=$(GPU_SITE):.$${PYTHONPATH:+:$$PYTHONPATH}

# Run it before every carry: the wheels are built once (seconds afterwards), COMMIT is rewritten every time.
gpu-wheels:
	@if ! ls $(GPU_WHEELS)/deepspeed-*.whl $(GPU_WHEELS)/simplejpeg-*.whl >/dev/null 2>&1; then \
		mkdir -p $(GPU_WHEELS) && rm -f $(GPU_WHEELS)/*.whl && \
		DS_BUILD_OPS=0 $(PYTHON) -m pip wheel -q --no-deps --no-cache-dir $(GPU_WHEEL_DEEPSPEED) -w $(GPU_WHEELS) && \
		$(PYTHON) -m pip download -q --no-deps $(GPU_WHEEL_PLATFORM) -d $(GPU_WHEELS) $(GPU_WHEEL_DEPS) || exit 1; fi
	git describe --always --dirty > $(GPU_WHEELS)/COMMIT 2>/dev/null || echo unknown > $(GPU_WHEELS)/COMMIT
	ls -l $(GPU_WHEELS) && du -sh $(GPU_WHEELS)

gpu-check:
	@if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1 && ! $(GPU_CHECK_PATH) $(GPU_PYTHON) -c "import deepspeed" >/dev/null 2>&1; \
	then echo "installing $(GPU_WHEELS)/ into $(GPU_SITE)"; \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; fi
	$(GPU_CHECK_PATH) $(GPU_PYTHON) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT)) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

# pytest-benchmark over the kernels (benchmarks/test_bench_kernels.py): BEiT shapes on a GPU, tiny shapes through
# Triton's interpreter on CPU. Saved under .benchmarks/; `--benchmark-compare` in BENCH_PYTEST_ARGS compares.
BENCH_PYTEST_ARGS ?=
bench-pytest:
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-autosave $(BENCH_PYTEST_ARGS)
