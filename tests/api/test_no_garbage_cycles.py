"""A call through batched_fn leaves no reference cycle behind, in every call style (issue 19 item 0).

Cycles are freed only by the garbage collector, whose passes over a large heap
(a server's imports, the model) are the tail at normal load; the example
server freezes its start-up heap (``gc.freeze()``) so that passes stay short,
which holds only while calls create no cycles of their own.  Each test runs a
warm-up, then, with the collector off, many calls, and asserts that a
collection finds nothing on a cycle (see garbage_of for the free-threaded build).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sysconfig
import threading
import time
import traceback
from collections import Counter
from typing import Any, Callable, Iterator

import pytest

from batched_fn import BatchedFn, Failed, Full, batched_fn, connect

CALLS = 200

#: the free-threaded build, where a collection also frees objects no cycle holds (see garbage_of)
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def on_cycles(objects: list[Any]) -> list[Any]:
    """The objects that lie on a reference cycle among objects (strongly connected, Tarjan)."""
    by_id = {id(o): o for o in objects}
    edges = {i: [id(r) for r in gc.get_referents(o) if id(r) in by_id] for i, o in by_id.items()}
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    found: list[Any] = []
    for root in by_id:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if child < len(edges[node]):
                work.append((node, child + 1))
                nxt = edges[node][child]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:                                  # node is done: pass its low to its parent
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.extend(by_id[m] for m in component)
    return found


def garbage_of(run: Callable[[int], None]) -> tuple[int, Counter[str]]:
    """What a collection finds after run(CALLS) with the collector off: a count and the types.

    On the GIL build every object a collection finds is owed to a cycle, so all are counted.
    The free-threaded build's collector also frees objects whose last reference another thread
    dropped and whose owner thread (a worker parked in C, say) has not yet merged the count:
    they are collected as if unreachable though no cycle holds them.  There the objects that lie
    on a cycle among those collected are counted: no cycle, no count, on either build.
    """
    run(10)                      # warm-up: first-call caches, lazily started threads
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run(CALLS)
        found = gc.collect()
        counted = on_cycles(gc.garbage) if FREE_THREADED else list(gc.garbage)
        kinds = Counter(type(o).__qualname__ for o in counted)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return (len(counted) if FREE_THREADED else found), kinds


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


def test_the_check_counts_cycles_and_only_cycles() -> None:
    class Node:
        pass

    def make_cycles(n: int) -> None:
        for _ in range(n):
            a, b = Node(), Node()
            a.other, b.other = b, a              # type: ignore[attr-defined]
            a.leaf = [object()]                  # type: ignore[attr-defined]
    count, kinds = garbage_of(make_cycles)
    nodes = sum(n for kind, n in kinds.items() if kind.endswith(".Node"))
    assert nodes == 2 * CALLS and count >= 2 * CALLS
    leaves = [[object()] for _ in range(3)]
    assert on_cycles(leaves) == []
    ring = [[], []]
    ring[0].append(ring[1])
    ring[1].append(ring[0])
    assert {id(o) for o in on_cycles([ring[0], ring[1], leaves[0]])} == {id(ring[0]), id(ring[1])}
    loop: list[Any] = []
    loop.append(loop)
    assert on_cycles([loop]) == [loop]


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


# ------------------------------------------------------------------ failing calls (issue 19 item 0)
#
# A failed call's exception carries a traceback, which holds the frames it passed through: the
# library must not keep the exception reachable from any of those frames (a future or waiter in a
# local, say), or each failure leaves a cycle.  The callers below take care not to make one of
# their own (futures are read with .exception(), exceptions bound with `as` are dropped).


def reject(batch: list[int]) -> list[int]:
    raise ValueError("rejected by the handler")


def fail_each(batch: list[int]) -> list[Any]:
    return [Failed(ValueError("rejected by the handler")) for _ in batch]


def failing_styles(f: Any, exc: type[BaseException], run_async: Callable[..., Any],
                   timeout: float = 10) -> dict[str, Callable[[int], None]]:
    """Each call style, calling f n times, every call expected to raise exc."""
    def blocking_run(n: int) -> None:
        for i in range(n):
            with pytest.raises(exc):
                f(i, timeout=timeout)

    def submitted_run(n: int) -> None:
        futures = [f.submit(i, timeout=timeout) for i in range(n)]
        assert all(isinstance(fut.exception(10), exc) for fut in futures)

    def awaited_run(n: int) -> None:
        async def one_by_one() -> None:
            for i in range(n):
                try:
                    await f.acall(i, timeout=timeout)
                except exc:
                    pass
                else:
                    raise AssertionError(f"no {exc.__name__}")

        async def together() -> None:
            outcomes = await asyncio.gather(*(f.acall(i, timeout=timeout) for i in range(n)),
                                            return_exceptions=True)
            assert all(isinstance(o, exc) for o in outcomes)

        async def both() -> None:
            await one_by_one()
            await together()

        run_async(both())
    return {"blocking": blocking_run, "submitted": submitted_run, "awaited": awaited_run}


@pytest.mark.parametrize("style", ["blocking", "submitted", "awaited"])
@pytest.mark.parametrize("handler", [reject, fail_each], ids=["handler-raises", "Failed-items"])
@pytest.mark.parametrize("where", ["in-process", "remote"])
def test_failed_calls_create_no_cycles(style: str, handler: Callable[..., Any], where: str,
                                       run_async: Callable[..., Any]) -> None:
    with batched_fn(handler, max_batch_size=8, max_delay=0.001) as f:
        if where == "remote":
            name = f"gc-cycles-failed-{os.getpid()}"
            f.share(name)
            with connect(name, timeout=10) as r:
                assert garbage_of(failing_styles(r, ValueError, run_async)[style]) == (0, Counter())
        else:
            assert garbage_of(failing_styles(f, ValueError, run_async)[style]) == (0, Counter())


@contextlib.contextmanager
def calling(f: BatchedFn[Any, Any], where: str) -> Iterator[Any]:
    """f itself, or f shared and reached through connect."""
    if where == "in-process":
        yield f
        return
    name = f"gc-cycles-{where}-{os.getpid()}-{id(f)}"
    f.share(name)
    with connect(name, timeout=10) as r:
        yield r


@pytest.mark.parametrize("style", ["blocking", "submitted", "awaited"])
@pytest.mark.parametrize("where", ["in-process", "remote"])
def test_full_rejections_create_no_cycles(style: str, where: str, run_async: Callable[..., Any]) -> None:
    release = threading.Event()

    def hold(batch: list[int]) -> list[int]:
        release.wait(10)
        return batch

    with batched_fn(hold, max_batch_size=1, max_delay=0, channel_cap=1) as f:
        running = f.submit(0)
        while f.stats().running == 0:     # the first call is inside the handler
            time.sleep(0.001)
        queued = f.submit(1)              # and the one place in the queue is taken
        try:
            with calling(f, where) as g:
                if style == "submitted" and where == "in-process":   # submit raises Full itself, at once
                    def run(n: int) -> None:
                        for i in range(n):
                            with pytest.raises(Full):
                                g.submit(i, timeout=10)
                    assert garbage_of(run) == (0, Counter())
                else:
                    assert garbage_of(failing_styles(g, Full, run_async)[style]) == (0, Counter())
        finally:
            release.set()
        assert (running.result(10), queued.result(10)) == (0, 1)


@pytest.mark.parametrize("style", ["blocking", "submitted", "awaited"])
@pytest.mark.parametrize("where", ["in-process", "remote"])
def test_timed_out_calls_create_no_cycles(style: str, where: str, run_async: Callable[..., Any]) -> None:
    release = threading.Event()

    def hold(batch: list[int]) -> list[int]:
        release.wait(10)
        return batch

    # every call times out inside the one running batch, or queued behind it (or is shed by the
    # estimate once a batch is known to take long: Full); both are failures the caller must see
    with batched_fn(hold, max_batch_size=1, max_delay=0, channel_cap=None) as f:
        try:
            with calling(f, where) as g:
                run = failing_styles(g, (TimeoutError, Full), run_async, timeout=0.002)[style]
                assert garbage_of(run) == (0, Counter())
        finally:
            release.set()


def test_an_awaited_failure_still_carries_the_handlers_traceback(run_async: Callable[..., Any]) -> None:
    """Breaking the cycles drops no frame the caller needs: the handler's raise is in the traceback."""
    with batched_fn(reject, max_batch_size=8, max_delay=0.001) as f:
        async def call() -> BaseException:
            try:
                await f.acall(1, timeout=10)
            except ValueError as exc:
                return exc
            raise AssertionError("no ValueError")

        exc = run_async(call())
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(exc.__traceback__)]
    assert "reject" in frames and "acall" in frames, frames
