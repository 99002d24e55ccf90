"""``python -m batched_fn --version``: the version, and which build of the core is installed.

Prints e.g. ``batched_fn 0.1.0 (release build, CPython 3.11, linux-x86_64)``.  The build's
flavour ("release", "debug", "asan", "tsan") is compiled into the core as ``BUILD_FLAVOUR``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import sys
import sysconfig
from typing import Iterable

import batched_fn

# The compiled module that carries BUILD_FLAVOUR; any other compiled module of the
# package is asked next (the core may be split into several extension modules).
_CORE = "_batchcore"


def build_flavour(path: Iterable[str] | None = None, package: str = "batched_fn") -> str:
    """The core's build flavour, or ``"unknown"`` if no module of ``package`` says it.

    Reads ``BUILD_FLAVOUR`` from ``package._batchcore`` first, then from the package's
    other private modules (those whose name starts with ``_``) in name order.
    """
    path = list(batched_fn.__path__ if path is None else path)
    names = [info.name for info in pkgutil.iter_modules(path)
             if not info.ispkg and info.name.startswith("_") and info.name not in ("__main__", _CORE)]
    for name in [_CORE, *sorted(names)]:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ImportError:
            continue
        flavour = getattr(module, "BUILD_FLAVOUR", None)
        if isinstance(flavour, str):
            return flavour
    return "unknown"


def version_line() -> str:
    """``batched_fn <version> (<flavour> build, <implementation> X.Y, <platform>)``."""
    python = f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        python += "t"   # a free-threaded interpreter
    return f"batched_fn {batched_fn.__version__} ({build_flavour()} build, {python}, {sysconfig.get_platform()})"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m batched_fn",
                                     description="Dynamic batching in front of a model.")
    parser.add_argument("--version", action="store_true", help="print the version and the core's build, then exit")
    args = parser.parse_args(argv)
    if args.version:
        print(version_line())
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
