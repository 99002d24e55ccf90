"""Build of the compiled core (src/batchcore) into the batched_fn package.

Environment switches, one build script for every build:
  BATCHCORE_DEBUG=1            -O0 -g, asserts on, Cython line tracing, invariant checks and
                               counters of live requests and parked callers
  BATCHCORE_SANITIZE=address|thread   adds -fsanitize=...
  BATCHCORE_ANNOTATE=1         writes Cython's HTML annotation next to the .pyx
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

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

FLAVOUR = {"address": "asan", "thread": "tsan"}.get(SANITIZE, "debug" if DEBUG else "release")
macros += [("BATCHCORE_FLAVOUR", f'"{FLAVOUR}"')]

# One extension module per .pyx in src/batchcore, each named batched_fn.<module>,
# listed from the lowest floor up (see _batchcore.pyx).
MODULES = ["_errors", "_request", "_aio", "_delivery", "_deadlines", "_admission", "_collector", "_batchcore",
           "_delay",   # test-only: the adaptive delay policy driven with a fake clock
           "_shm"]     # the shared-memory ring (measured, not yet on the call path)

# Cython names a module, and the modules it cimports, after the package
# directory its files sit in.  The sources live in src/batchcore; a staging
# package build/cython/batched_fn of links to them gives them their runtime
# names (batched_fn._request, ...), so `from batched_fn._request cimport ...`
# finds the .pxd and imports the right module at run time.
SRC = Path("src/batchcore")
STAGE = Path("build/cython/batched_fn")


def stage_sources() -> None:
    STAGE.mkdir(parents=True, exist_ok=True)
    marker = STAGE / "__init__.pxd"
    if not marker.exists():
        marker.write_text("# marks the staging directory as the batched_fn package\n")
    for src in SRC.iterdir():
        if src.suffix in (".pyx", ".pxd", ".h"):
            link, target = STAGE / src.name, os.path.relpath(src, STAGE)
            if link.is_symlink() and os.readlink(link) == target:
                continue      # already staged (and maybe being read by a parallel build)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)


stage_sources()
extensions = [
    Extension(
        f"batched_fn.{name}",
        [str(STAGE / f"{name}.pyx")],
        include_dirs=[str(SRC)],
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[str(STAGE.parent), str(SRC)],
        compiler_directives=directives,
        annotate=os.environ.get("BATCHCORE_ANNOTATE", "") not in ("", "0"),
    ),
)
