"""Regressions found by review: each test failed before its fix."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from batched_fn import BatchedFnError, Full, batched_fn
from conftest import MSG_TIMEOUT, wait_until


def test_stopiteration_from_the_handler_reaches_asyncio_callers(run_async):
    # asyncio refuses StopIteration as a future's exception; the callers of that
    # batch (and of batches drained with it) must still get an outcome.
    def handler(batch):
        if "boom" in batch:
            raise StopIteration("empty iterator inside the handler")
        return batch

    f = batched_fn(handler, max_batch_size=8, max_delay=0.05)

    async def main():
        tasks = [asyncio.ensure_future(f.acall(x, timeout=0.5)) for x in ("ok1", "boom", "ok2")]
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        return [t.exception() for t in tasks]

    errors = run_async(main())
    for err in errors:
        assert isinstance(err, BatchedFnError) and isinstance(err.__cause__, StopIteration)
    assert run_async(f.acall("after")) == "after"
    f.close()


def test_drop_oldest_evicts_from_the_forming_batch():
    f = batched_fn(lambda b: b, max_batch_size=8, max_delay=1.0, channel_cap=2, on_full="drop_oldest")
    f.start()
    first, second = f.submit(0), f.submit(1)
    time.sleep(0.1)                 # the worker holds both in its forming batch
    third = f.submit(2)             # evicts the oldest instead of raising Full
    with pytest.raises(Full, match="evicted"):
        first.result(5)
    f.close()
    assert (second.result(5), third.result(5)) == (1, 2)
    s = f.stats()
    assert (s.rejected, s.failed, s.completed) == (0, 1, 2)


def test_close_from_an_evicted_futures_callback_does_not_deadlock():
    child = textwrap.dedent('''
        import threading, time
        from batched_fn import batched_fn
        gate = threading.Event()
        f = batched_fn(lambda b: (gate.wait(), b)[1], max_batch_size=1, max_delay=0,
                       channel_cap=1, on_full="drop_oldest")
        f.submit(0)
        time.sleep(0.1)
        old = f.submit(1)
        old.add_done_callback(lambda fut: f.close(timeout=0))
        f.submit(2)                  # evicts 1: its callback closes f
        print("submit returned")
        gate.set()
    ''')
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "submit returned" in proc.stdout


def test_an_on_batch_callback_raising_systemexit_does_not_kill_the_worker():
    calls = []

    def on_batch(info):
        calls.append(info)
        if len(calls) == 1:
            sys.exit("callback bug")

    f = batched_fn(lambda b: b, max_batch_size=4, max_delay=0.001, on_batch=on_batch)
    assert f(1) == 1
    assert f.submit(2).result(5) == 2
    assert f.healthy
    f.close()


def test_acall_block_polls_are_not_counted_as_rejections(run_async):
    gate = threading.Event()
    f = batched_fn(lambda b: (gate.wait(10), b)[1], max_batch_size=1, max_delay=0, channel_cap=1,
                   on_full="block")

    async def main():
        t1 = asyncio.ensure_future(f.acall(1))
        await asyncio.sleep(0.05)
        t2 = asyncio.ensure_future(f.acall(2))
        await asyncio.sleep(0.01)
        t3 = asyncio.ensure_future(f.acall(3))     # waits for room, polling
        await asyncio.sleep(0.1)
        gate.set()
        return await asyncio.gather(t1, t2, t3)

    assert run_async(main()) == [1, 2, 3]
    s = f.stats()
    assert (s.submitted, s.completed, s.rejected) == (3, 3, 0)
    f.close()


def test_acall_block_timeout_covers_waiting_for_room_and_for_a_batch(run_async):
    gate = threading.Event()

    def handler(batch):
        if batch == [1]:
            time.sleep(0.35)     # the queue slot frees at ~0.35 s
        else:
            gate.wait(10)        # then the worker stays busy, so 3 is never taken
        return batch

    f = batched_fn(handler, max_batch_size=1, max_delay=0, channel_cap=1, on_full="block")

    async def main():
        t1 = asyncio.ensure_future(f.acall(1))
        await asyncio.sleep(0.05)
        t2 = asyncio.ensure_future(f.acall(2))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
            await f.acall(3, timeout=0.4)
        took = time.monotonic() - start
        gate.set()
        await asyncio.gather(t1, t2)
        return took

    took = run_async(main())
    # one 0.4 s deadline for both waits; before the fix it restarted after the room wait (~0.75 s)
    assert took < 0.6
    wait_until(lambda: f.stats().running == 0)
    f.close()
