"""Build of the compiled core (src/batchcore) into the batched_fn package.

Environment switches, one build script for every build:
  BATCHCORE_DEBUG=1            -O0 -g, asserts on, Cython line tracing, invariant checks and
                               counters of live requests and parked callers
  BATCHCORE_SANITIZE=address|thread   adds -fsanitize=...
  BATCHCORE_ANNOTATE=1         writes Cython's HTML annotation next to the .pyx
  BATCHCORE_PARK=portable      threads sleep on a mutex and condition variable instead of
                               Linux futexes (park.h): the build used off Linux, selectable
                               on Linux so that it is tested there (`make test-portable`)
"""

import os
import sys
from pathlib import Path

# The switches are checked before Cython is imported, so a bad value is named even where the
# build tools are missing.
if sys.platform == "win32":
    raise SystemExit("batched_fn does not build on Windows: its core needs POSIX threads and clocks. "
                     "It runs on Linux (x86_64, aarch64) and builds on macOS; on Windows, use WSL.")

DEBUG = os.environ.get("BATCHCORE_DEBUG", "") not in ("", "0")
SANITIZE = os.environ.get("BATCHCORE_SANITIZE", "")
if SANITIZE not in ("", "address", "thread"):
    raise SystemExit(f"invalid BATCHCORE_SANITIZE value: expected 'address' or 'thread' (got {SANITIZE!r})")

cflags = ["-std=c11", "-Wall", "-Wno-unused-function", "-Wsign-compare"]
ldflags = []
macros = []
# freethreading_compatible: every module keeps its shared state correct with
# threads running truly in parallel (each says what guards what), so importing
# it leaves a free-threaded interpreter's GIL off.
directives = {"language_level": 3, "embedsignature": True, "freethreading_compatible": True}
if DEBUG:
    cflags += ["-O0", "-g", "-UNDEBUG"]
    macros += [("BATCHCORE_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    directives["linetrace"] = True
elif not SANITIZE:
    # Release: no debug info, and the linker strips the symbol table (the
    # extension's exported PyInit_* lives in the dynamic table and stays).
    cflags += ["-O3", "-g0"]
    ldflags += ["-s"]
else:
    cflags += ["-O3"]
if SANITIZE:
    cflags += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
    if SANITIZE == "thread":
        cflags += ["-Wno-tsan"]   # TSan does not model fences; the C stress tests cover them
    ldflags += [f"-fsanitize={SANITIZE}"]

PARK = os.environ.get("BATCHCORE_PARK", "")
if PARK not in ("", "portable"):
    raise SystemExit(f"invalid BATCHCORE_PARK value: expected 'portable' or unset (got {PARK!r})")
if PARK == "portable":
    macros += [("BATCHCORE_PORTABLE_PARK", "1")]

from Cython.Build import cythonize  # noqa: E402
from setuptools import Extension, setup  # noqa: E402

FLAVOUR = {"address": "asan", "thread": "tsan"}.get(SANITIZE, "debug" if DEBUG else "release")
macros += [("BATCHCORE_FLAVOUR", f'"{FLAVOUR}"')]

# One extension module, batched_fn._batchcore: src/batchcore/_batchcore.pyx
# includes the other .pyx files of src/batchcore (its parts, cut by job).
# Cython finds the module's .pxd at python/batched_fn/_batchcore.pxd (the
# package directory of its name); that file includes the parts' .pxd from
# src/batchcore, where the .pxd of the C headers (atomics, park, ...) also are.
SRC = Path("src/batchcore")
extensions = [
    Extension(
        "batched_fn._batchcore",
        [str(SRC / "_batchcore.pyx")],
        include_dirs=[str(SRC)],
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["python", str(SRC)],
        compiler_directives=directives,
        annotate=os.environ.get("BATCHCORE_ANNOTATE", "") not in ("", "0"),
    ),
)
