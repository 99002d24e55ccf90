"""acall from asyncio, on the default loop and on uvloop (fixture run_async)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from batched_fn import BatchedFnError, Closed, Full, batched_fn
from helpers import MSG_CLOSED, MSG_FULL, MSG_TIMEOUT, assert_runs_under


def test_acall_returns_each_tasks_own_output(run_async):
    sizes = []
    f = batched_fn(lambda b: sizes.append(len(b)) or [x * 2 for x in b], max_batch_size=32, max_delay=0.002)

    async def main():
        return await asyncio.gather(*(f.acall(i) for i in range(2000)))

    assert run_async(main()) == [i * 2 for i in range(2000)]
    assert max(sizes) > 1 and max(sizes) <= 32
    f.close()


def test_acall_never_blocks_the_event_loop(run_async):
    f = batched_fn(lambda b: time.sleep(0.2) or b, max_delay=0)

    async def main():
        ticks = 0
        task = asyncio.ensure_future(f.acall(1))

        while not task.done():
            ticks += 1
            await asyncio.sleep(0.005)
        return ticks, task.result()

    ticks, result = run_async(main())
    assert result == 1 and ticks >= 10    # the loop kept running during the 0.2 s handler
    f.close()


def test_acall_raises_the_handler_error_and_batchedfnerror(run_async):
    f = batched_fn(lambda b: 1 / 0 if b[0] == "boom" else b[:0], max_delay=0)

    async def main():
        with pytest.raises(ZeroDivisionError):
            await f.acall("boom")
        with pytest.raises(BatchedFnError, match="handler returned 0 outputs for a batch of 1 inputs"):
            await f.acall("short")

    run_async(main())
    f.close()


def test_acall_timeout_and_cancellation_withdraw_queued_requests(run_async):
    release = threading.Event()
    seen: list = []

    def handler(batch):
        seen.extend(batch)
        release.wait(10)
        return batch

    f = batched_fn(handler, max_batch_size=8, max_delay=0)

    async def main():
        first = asyncio.ensure_future(f.acall("first"))
        while f.stats().running == 0:
            await asyncio.sleep(0.001)
        with assert_runs_under(3):
            with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
                await f.acall("late", timeout=0.05)
        victim = asyncio.ensure_future(f.acall("cancelled"))
        await asyncio.sleep(0.01)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        release.set()
        assert await first == "first"
        assert await f.acall("after") == "after"

    run_async(main())
    assert "late" not in seen and "cancelled" not in seen
    s = f.stats()
    assert (s.timed_out, s.cancelled) == (1, 1)
    f.close()


def test_cancelling_a_request_already_in_a_batch_discards_its_result(run_async):
    entered = threading.Event()
    release = threading.Event()

    def handler(batch):
        entered.set()
        release.wait(10)
        return batch

    f = batched_fn(handler, max_delay=0)

    async def main():
        task = asyncio.ensure_future(f.acall("x"))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await f.acall("y") == "y"

    run_async(main())
    assert f.stats().completed == 2     # it ran; its caller just did not want it
    f.close()


def test_acall_full_and_closed(run_async):
    release = threading.Event()
    f = batched_fn(lambda b: release.wait(10) and b, max_batch_size=1, max_delay=0, channel_cap=1)

    async def main():
        first = asyncio.ensure_future(f.acall(0))
        while f.stats().running == 0:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(f.acall(1))
        await asyncio.sleep(0.01)
        with pytest.raises(Full, match=MSG_FULL):
            await f.acall(2)
        release.set()
        assert await asyncio.gather(first, second) == [0, 1]
        f.close()
        with pytest.raises(Closed, match=MSG_CLOSED):
            await f.acall(3)

    run_async(main())


def test_one_call_soon_threadsafe_per_batch_per_loop():
    release = threading.Event()
    f = batched_fn(lambda b: release.wait(10) and b, max_batch_size=64, max_delay=0)
    loop = asyncio.new_event_loop()
    calls = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        calls.append(callback)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

    async def main():
        first = asyncio.ensure_future(f.acall(-1))
        while f.stats().running == 0:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(f.acall(i)) for i in range(50)]
        while f.stats().queued < 50:
            await asyncio.sleep(0.001)
        release.set()
        return await first, await asyncio.gather(*rest)

    try:
        first, rest = loop.run_until_complete(main())
    finally:
        loop.close()
    assert rest == list(range(50))
    assert f.stats().batches == 2
    # at most one per batch (fewer when the loop has not drained the last one
    # yet), never one per request
    assert 1 <= len(calls) <= 2
    f.close()


def test_callers_on_several_loops_share_one_batch():
    release = threading.Event()
    f = batched_fn(lambda b: release.wait(10) and [(x, len(b)) for x in b], max_batch_size=64, max_delay=0)
    blocker = f.submit("block")
    while f.stats().running == 0:
        time.sleep(0.001)
    results: dict[int, list] = {}

    def run_loop(k):
        async def main():
            return await asyncio.gather(*(f.acall((k, i)) for i in range(10)))

        results[k] = asyncio.run(main())

    threads = [threading.Thread(target=run_loop, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    while f.stats().queued < 30:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert blocker.result(5)[0] == "block"
    for k in range(3):
        assert [r[0] for r in results[k]] == [(k, i) for i in range(10)]
        assert all(r[1] == 30 for r in results[k])   # one batch across three loops
    f.close()


def test_stress_64_threads_and_2000_tasks_each_get_their_own_output(run_async):
    f = batched_fn(lambda b: [("out", x) for x in b], max_batch_size=32, max_delay=0.001)
    thread_results: dict[int, list] = {}

    def thread_caller(k):
        thread_results[k] = [f(("t", k, i)) for i in range(50)]

    threads = [threading.Thread(target=thread_caller, args=(k,)) for k in range(64)]
    for t in threads:
        t.start()

    async def main():
        return await asyncio.gather(*(f.acall(("a", k)) for k in range(2000)))

    async_results = run_async(main())
    for t in threads:
        t.join()
    assert async_results == [("out", ("a", k)) for k in range(2000)]
    for k, outs in thread_results.items():
        assert outs == [("out", ("t", k, i)) for i in range(50)]
    s = f.stats()
    assert s.completed == 2000 + 64 * 50 == s.submitted
    f.close()
