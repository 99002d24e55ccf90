# batched_fn: every target does its own set-up in a local venv (.venv).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
EXTRAS  ?= test,torch,server,model,prometheus,bench
CC      ?= gcc

.PHONY: all venv install compile debug test test-fast test-debug tsan tsan-py asan demo serve bench bench-quick soak clean

all: test

# torch first and pinned: resolved through another package it would pull a CUDA build.
$(VENV)/.stamp-base:
	$(PY) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=77" "Cython~=3.1" wheel
	touch $@

venv: $(VENV)/.stamp-base

# Installs the package (not editable) so tests run against the built wheel's files.
install: venv
	$(PIP) install -q --no-build-isolation ".[$(EXTRAS)]"

# Build the extension in place (python/batched_fn) for quick iteration: PYTHONPATH=python.
compile: venv
	$(VPY) setup.py -q build_ext --inplace

debug: venv
	BATCHCORE_DEBUG=1 $(VPY) setup.py -q build_ext --inplace --force

# The README's test command: the suite, the asyncio tests again under
# PYTHONASYNCIODEBUG=1, the native ring stress test under ThreadSanitizer and
# the sanitizer workload under AddressSanitizer.
test: install
	cd tests && ../$(VPY) -m pytest -q -p no:cacheprovider .
	cd tests && PYTHONASYNCIODEBUG=1 ../$(VPY) -m pytest -q -p no:cacheprovider -m aio .
	$(MAKE) test-debug tsan asan

test-fast: install
	cd tests && ../$(VPY) -m pytest -q -x -p no:cacheprovider .

# The core tests again on a debug build (-O0, asserts, BATCHCORE_DEBUG invariant checks).
test-debug: venv
	rm -rf build/debug && mkdir -p build/debug && cp -r python/batched_fn build/debug/ && rm -f build/debug/batched_fn/*.so
	BATCHCORE_DEBUG=1 $(VPY) setup.py -q build_ext --force --build-lib build/debug --build-temp build/debug-tmp
	cd tests && PYTHONPATH=../build/debug ../$(VPY) -m pytest -q -p no:cacheprovider \
		test_api.py test_async_api.py test_features.py test_faults.py test_property.py

# Native stress tests of ring.h alone (several producer and consumer pthreads)
# and of shm_ring.h (a producer and a consumer as two threads, then as two
# processes sharing a mapping), no Python, built with ThreadSanitizer.
tsan: venv
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
tsan-py: venv
	rm -rf build/tsanpy && mkdir -p build/tsanpy && cp -r python/batched_fn build/tsanpy/ && rm -f build/tsanpy/batched_fn/*.so
	BATCHCORE_SANITIZE=thread $(VPY) setup.py -q build_ext --force --build-lib build/tsanpy --build-temp build/tsanpy-tmp
	WORKLOAD_ROUNDS=2 TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" LD_PRELOAD=$$($(CC) -print-file-name=libtsan.so) \
		PYTHONPATH=build/tsanpy $(VPY) tests/sanitizer_workload.py

# The ring test under AddressSanitizer+UBSan, then the extension built with
# ASan running a short Python workload (threads, asyncio, faults, close).
asan: venv
	mkdir -p build
	$(CC) -std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -pthread -Isrc/batchcore tests/c/test_ring.c -o build/test_ring_asan
	./build/test_ring_asan 4 2 100000
	rm -rf build/asan && mkdir -p build/asan && cp -r python/batched_fn build/asan/ && rm -f build/asan/batched_fn/*.so
	BATCHCORE_SANITIZE=address $(VPY) setup.py -q build_ext --force --build-lib build/asan --build-temp build/asan-tmp
	ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) PYTHONMALLOC=malloc \
		PYTHONPATH=build/asan $(VPY) tests/sanitizer_workload.py

demo: install
	$(VPY) -m batched_fn.examples.demo

serve: install
	$(VPY) -m batched_fn.examples.server

# Peers (batched, async-batcher, ray[serve]) are pinned and installed by the script.
bench: install
	$(VPY) benchmarks/run_all.py --install-peers

bench-quick: install
	$(VPY) benchmarks/run_all.py --install-peers --quick

soak: install
	$(VPY) benchmarks/soak.py --requests 1000000

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/batched_fn/*.so src/batchcore/*.c src/batchcore/*.html
