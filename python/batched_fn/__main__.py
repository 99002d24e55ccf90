"""``python -m batched_fn --version``: the version, and which build of the core is installed.

Prints e.g. ``batched_fn 0.1.0 (release build, CPython 3.11, linux-x86_64)``.  The build's
flavour ("release", "debug", "asan", "tsan") is compiled into the core as ``BUILD_FLAVOUR``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import sysconfig
import batched_fn


def build_flavour(package: str = "batched_fn") -> str:
    """The core's build flavour: ``BUILD_FLAVOUR`` of ``package._batchcore``, or ``"unknown"``."""
    try:
        core = importlib.import_module(f"{package}._batchcore")
    except ImportError:
        return "unknown"
    flavour = getattr(core, "BUILD_FLAVOUR", None)
    return flavour if isinstance(flavour, str) else "unknown"


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
