"""Fixtures of every test: event loops (asyncio and uvloop), a seeded Rand, the debug build's
counter check.  Helpers that tests import are in helpers.py, not here."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import sysconfig
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest

from helpers import Rand

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency
    uvloop = None


LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test that runs an event loop is marked `aio`, so `make test` can run
    # them again under PYTHONASYNCIODEBUG=1.
    for item in items:
        if "run_async" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.aio)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "aio: runs an event loop (default and uvloop)")


#: a free-threaded interpreter (3.13t, 3.14t): the suite must run with its GIL off
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
#: the GIL was asked for (PYTHON_GIL=1: the core tests run again that way)
GIL_FORCED = os.environ.get("PYTHON_GIL") == "1"


def gil_enabled() -> bool:
    """True while this interpreter runs with a GIL (always on a regular build)."""
    return getattr(sys, "_is_gil_enabled", lambda: True)()


def pytest_sessionstart(session: pytest.Session) -> None:
    # Importing the package (every compiled module) must leave the GIL off.
    if FREE_THREADED and not GIL_FORCED:
        import batched_fn  # noqa: F401
        from batched_fn import _batchcore  # noqa: F401  (the one extension module)
        if gil_enabled():
            raise pytest.UsageError("free-threaded interpreter: the GIL is on after importing batched_fn "
                                    "(a compiled module does not declare free-threading support?)")


@pytest.fixture(autouse=True)
def gil_stays_off() -> Iterator[None]:
    """On a free-threaded interpreter (unless PYTHON_GIL=1), fail a test after which the GIL is on:
    a module it imported re-enabled it, and the rest of the run would not test free threading."""
    yield
    if FREE_THREADED and not GIL_FORCED and gil_enabled():
        pytest.fail("the GIL was re-enabled during this test (a module imported without "
                    "free-threading support?); run with PYTHON_GIL=0 to find which")


@pytest.fixture(params=LOOPS)
def run_async(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine to completion on the parametrised loop kind."""
    kind = request.param

    def run(coro: Awaitable[Any]) -> Any:
        if kind == "uvloop":
            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        if os.environ.get("PYTHONASYNCIODEBUG"):
            loop.set_debug(True)
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    run.kind = kind  # type: ignore[attr-defined]
    return run


@pytest.fixture
def rand() -> Rand:
    return Rand(int(os.environ.get("TEST_SEED", random.randrange(1 << 30))))


@pytest.fixture(autouse=True)
def core_counters_back_to_zero() -> Iterator[None]:
    """Debug builds: after each test every Request was freed and no caller sleeps.

    (uvloop's test base checks its handle counters the same way.)  A release
    build keeps no counters, so this checks nothing there.
    """
    yield
    from batched_fn import _batchcore
    if _batchcore.BUILD_FLAVOUR != "debug":
        return
    import gc

    def settled() -> bool:
        gc.collect()
        return all(v == 0 for v in _batchcore.debug_counters().values())

    end = time.monotonic() + 5.0
    while not settled():
        if time.monotonic() > end:
            raise AssertionError(f"core debug counters not back to zero: {_batchcore.debug_counters()}")
        time.sleep(0.01)
