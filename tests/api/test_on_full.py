"""Overflow policies: on_full='reject', 'block' and 'drop_oldest'."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from batched_fn import Closed, Full, batched_fn
from helpers import (
    MSG_FULL, MSG_NO_ROOM, MSG_TIMEOUT, Blocker, assert_runs_under, occupy, wait_until,
)


def test_on_full_reject_carries_queued_and_retry_after():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=1, max_delay=0, channel_cap=3)
    occupier = occupy(f)
    queued = [f.submit(i) for i in range(3)]
    with pytest.raises(Full, match=MSG_FULL) as info:
        f.submit(99)
    assert info.value.queued == 3 and info.value.retry_after >= 0.0
    blocker.release.set()
    assert [q.result(5) for q in queued] == [0, 1, 2]
    occupier.result(5)
    f.close()


def test_on_full_drop_oldest_evicts_the_oldest_queued_request():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=2, on_full="drop_oldest")
    occupier = occupy(f)
    a, b = f.submit("a"), f.submit("b")
    c = f.submit("c")                      # evicts a
    with pytest.raises(Full, match="evicted"):
        a.result(5)
    blocker.release.set()
    assert (b.result(5), c.result(5)) == ("b", "c")
    occupier.result(5)
    assert "a" not in [x for batch in blocker.batches for x in batch]
    s = f.stats()
    assert s.failed == 1 and s.rejected == 0
    f.close()


def test_on_full_drop_oldest_from_asyncio(run_async):
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=1, on_full="drop_oldest")
    occupier = occupy(f)

    async def main():
        old = asyncio.ensure_future(f.acall("old"))
        await asyncio.sleep(0.01)
        new = asyncio.ensure_future(f.acall("new"))
        await asyncio.sleep(0.01)
        blocker.release.set()
        with pytest.raises(Full, match="evicted"):
            await old
        return await new

    assert run_async(main()) == "new"
    occupier.result(5)
    f.close()


def test_on_full_block_waits_for_room_then_runs():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=1, on_full="block")
    occupier = occupy(f)
    first = f.submit("first")
    done = []
    t = threading.Thread(target=lambda: done.append(f("blocked")))
    t.start()
    time.sleep(0.05)
    assert done == [] and t.is_alive()      # waiting for room, not refused
    blocker.release.set()
    t.join(5)
    assert done == ["blocked"] and first.result(5) == "first"
    occupier.result(5)
    f.close()


def test_on_full_block_times_out_and_close_wakes_blocked_callers():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=1, on_full="block")
    occupier = occupy(f)
    f.submit("fills the queue")
    with assert_runs_under(3):
        with pytest.raises(TimeoutError, match="no room in the queue"):
            f("waits", timeout=0.05)
    outcome = []

    def blocked():
        try:
            f("waits forever")
        except Closed as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.05)
    closer = threading.Thread(target=f.close)
    closer.start()
    t.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], Closed)
    blocker.release.set()
    closer.join(5)
    occupier.result(5)


def test_on_full_block_from_asyncio_does_not_block_the_loop(run_async):
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=1, on_full="block")
    occupier = occupy(f)

    async def main():
        filler = asyncio.ensure_future(f.acall("filler"))
        await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(f.acall("waiter"))
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.002)
            ticks += 1
        assert not waiter.done()
        with pytest.raises(TimeoutError, match=MSG_NO_ROOM):
            await f.acall("gives up", timeout=0.02)
        blocker.release.set()
        return ticks, await filler, await waiter

    assert run_async(main()) == (10, "filler", "waiter")
    occupier.result(5)
    f.close()


def test_on_full_other_values_are_rejected():
    expected = r"invalid on_full value: expected one of 'reject', 'block', 'drop_oldest' \(got 'drop'\)"
    with pytest.raises(ValueError, match=expected):
        batched_fn(lambda b: b, on_full="drop")


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
