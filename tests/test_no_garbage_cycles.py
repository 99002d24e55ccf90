"""A call through batched_fn leaves no reference cycle behind, in every call style (issue 19 item 0).

Cycles are freed only by the garbage collector, whose passes over a large heap
(a server's imports, the model) are the tail at normal load; the example
server freezes its start-up heap (``gc.freeze()``) so that passes stay short,
which holds only while calls create no cycles of their own.  Each test runs a
warm-up, then, with the collector off, many calls, and asserts that a
collection finds nothing.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections import Counter
from typing import Any, Callable, Iterator

import pytest

from batched_fn import BatchedFn, batched_fn, connect

CALLS = 200


def garbage_of(run: Callable[[int], None]) -> tuple[int, Counter[str]]:
    """Objects a collection finds after run(CALLS) with the collector off, and their types."""
    run(10)                      # warm-up: first-call caches, lazily started threads
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run(CALLS)
        found = gc.collect()
        kinds = Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return found, kinds


def double(batch: list[int]) -> list[int]:
    return [x * 2 for x in batch]


@pytest.fixture
def fn() -> Iterator[BatchedFn[int, int]]:
    f = batched_fn(double, max_batch_size=8, max_delay=0.001).start()
    yield f
    f.close()


@pytest.fixture
def remote(fn: BatchedFn[int, int]) -> Iterator[Any]:
    name = f"gc-cycles-{os.getpid()}"
    fn.share(name)
    r = connect(name, timeout=10)
    yield r
    r.close()


def blocking(f: Any) -> Callable[[int], None]:
    def run(n: int) -> None:
        for i in range(n):
            assert f(i, timeout=10) == 2 * i
    return run


def submitted(f: Any) -> Callable[[int], None]:
    def run(n: int) -> None:
        futures = [f.submit(i, timeout=10) for i in range(n)]
        assert [fut.result(10) for fut in futures] == [2 * i for i in range(n)]
    return run


def awaited(f: Any, run_async: Callable[..., Any]) -> Callable[[int], None]:
    def run(n: int) -> None:
        async def one_by_one() -> None:
            for i in range(n):
                assert await f.acall(i, timeout=10) == 2 * i

        async def together() -> list[int]:
            return list(await asyncio.gather(*(f.acall(i, timeout=10) for i in range(n))))

        async def both() -> None:
            await one_by_one()
            assert await together() == [2 * i for i in range(n)]

        run_async(both())
    return run


def test_blocking_calls_create_no_cycles(fn: BatchedFn[int, int]) -> None:
    assert garbage_of(blocking(fn)) == (0, Counter())


def test_submitted_calls_create_no_cycles(fn: BatchedFn[int, int]) -> None:
    assert garbage_of(submitted(fn)) == (0, Counter())


def test_awaited_calls_create_no_cycles(fn: BatchedFn[int, int], run_async: Callable[..., Any]) -> None:
    # the loop is made and closed inside each run: count only what the calls leave, so warm up the
    # loop kind first (a new loop's own start-up creates no cycles either, as this shows)
    assert garbage_of(awaited(fn, run_async)) == (0, Counter())


def test_remote_blocking_calls_create_no_cycles(remote: Any) -> None:
    assert garbage_of(blocking(remote)) == (0, Counter())


def test_remote_submitted_calls_create_no_cycles(remote: Any) -> None:
    assert garbage_of(submitted(remote)) == (0, Counter())


def test_remote_awaited_calls_create_no_cycles(remote: Any, run_async: Callable[..., Any]) -> None:
    assert garbage_of(awaited(remote, run_async)) == (0, Counter())


def test_a_blocking_call_that_fails_creates_no_cycles() -> None:
    def reject(batch: list[int]) -> list[int]:
        raise ValueError("no")

    with batched_fn(reject, max_batch_size=8, max_delay=0.001) as f:
        def run(n: int) -> None:
            for _ in range(n):
                with pytest.raises(ValueError, match="no"):
                    f(1, timeout=10)
        assert garbage_of(run) == (0, Counter())
