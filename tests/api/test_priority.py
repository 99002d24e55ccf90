"""priority= (GUIDE §11): batches form highest priority first, then earliest deadline, then arrival.

Order is observed with a handler of batch size 1 whose first batch blocks
(helpers.Blocker): everything queued meanwhile is served in the scheduler's
order once it is released.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import batched_fn._api as api
from _shared_tools import unique_name
from batched_fn import Full, batched_fn, connect
from helpers import Blocker, mixed_priority_load, occupy, wait_until

PRIORITY_RANGE = "an int between -2147483648 and 2147483647"


def served(blocker: Blocker) -> list:
    """Inputs in the order the handler saw them, without the occupier."""
    return [x for batch in blocker.batches for x in batch if x != "occupier"]


def test_batches_take_the_highest_priority_first_then_the_earliest_deadline_then_arrival():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=1, max_delay=0)
    occupier = occupy(f)
    futures = [
        f.submit("p0-a"),
        f.submit("p0-b"),
        f.submit("p2-late", priority=2, timeout=60),
        f.submit("p2-soon", priority=2, timeout=30),
        f.submit("p2-none", priority=2),
        f.submit("p-1", priority=-1),
        f.submit("p5", priority=5),
    ]
    blocker.release.set()
    for fut in futures:
        fut.result(10)
    occupier.result(10)
    assert served(blocker) == ["p5", "p2-soon", "p2-late", "p2-none", "p0-a", "p0-b", "p-1"]
    f.close()


def test_a_larger_batch_takes_the_best_requests_queued():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=3, max_delay=0)
    occupier = occupy(f)
    low = [f.submit(f"low{i}") for i in range(4)]
    high = [f.submit(f"high{i}", priority=1) for i in range(2)]
    blocker.release.set()
    for fut in low + high:
        fut.result(10)
    occupier.result(10)
    assert blocker.batches[1] == ["low0", "high0", "high1"]     # chosen by priority, given in arrival order
    assert blocker.batches[2] == ["low1", "low2", "low3"]
    f.close()


def test_every_call_style_carries_its_priority(run_async):
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=1, max_delay=0)
    occupier = occupy(f)
    results: dict[str, object] = {}
    thread = threading.Thread(target=lambda: results.setdefault("blocking", f("blocking", priority=3)))
    thread.start()
    wait_until(lambda: f.stats().queued == 1)
    fut = f.submit("future", priority=1)
    wait_until(lambda: f.stats().queued == 2)

    async def main():
        task = asyncio.ensure_future(f.acall("async", priority=2))
        while f.stats().queued < 3:
            await asyncio.sleep(0.001)
        low = asyncio.ensure_future(f.acall("low"))
        while f.stats().queued < 4:
            await asyncio.sleep(0.001)
        blocker.release.set()
        return await task, await low

    assert run_async(main()) == ("async", "low")
    thread.join(10)
    assert results["blocking"] == "blocking" and fut.result(10) == "future"
    occupier.result(10)
    assert served(blocker) == ["blocking", "async", "future", "low"]
    f.close()


@pytest.mark.parametrize("bad, kind, shown", [
    (True, TypeError, "True"), (1.0, TypeError, "1.0"), ("1", TypeError, "'1'"), (None, TypeError, "None"),
    (2**31, ValueError, "2147483648"), (-(2**31) - 1, ValueError, "-2147483649"),
])
def test_a_bad_priority_is_refused_naming_the_value(bad, kind, shown, run_async):
    message = f"invalid priority value: expected {PRIORITY_RANGE} (got {shown})"
    with batched_fn(lambda b: b) as f:
        with pytest.raises(kind, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
            f(1, priority=bad)
        with pytest.raises(kind, match="invalid priority value"):
            f.submit(1, priority=bad)

        async def main():
            with pytest.raises(kind, match="invalid priority value"):
                await f.acall(1, priority=bad)

        run_async(main())
        assert f.stats().submitted == 0


def test_the_extreme_priorities_are_accepted():
    with batched_fn(lambda b: b) as f:
        assert f(1, priority=2**31 - 1) == 1 and f(2, priority=-(2**31)) == 2


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_a_bad_priority_aging_is_refused(bad):
    with pytest.raises((TypeError, ValueError), match="invalid priority_aging value"):
        batched_fn(lambda b: b, priority_aging=bad)


def test_aging_lets_a_long_waiting_low_priority_request_go_before_newer_high_ones():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=1, max_delay=0, priority_aging=0.02)
    occupier = occupy(f)
    old = f.submit("old-low")
    time.sleep(0.3)                  # about 15 levels gained by waiting
    newer = [f.submit(f"high{i}", priority=3) for i in range(3)]
    blocker.release.set()
    for fut in [old, *newer]:
        fut.result(10)
    occupier.result(10)
    assert served(blocker) == ["old-low", "high0", "high1", "high2"]
    f.close()


def test_without_aging_priority_is_strict():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=1, max_delay=0, priority_aging=None)
    occupier = occupy(f)
    old = f.submit("old-low")
    time.sleep(0.1)
    newer = [f.submit(f"high{i}", priority=1) for i in range(3)]
    blocker.release.set()
    for fut in [old, *newer]:
        fut.result(10)
    occupier.result(10)
    assert served(blocker) == ["high0", "high1", "high2", "old-low"]
    f.close()


def test_a_full_queue_evicts_the_lowest_priority_with_the_furthest_deadline_for_a_higher_one():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=3)
    occupier = occupy(f)
    keep_low = f.submit("low-soon", timeout=30)
    victim = f.submit("low-far", timeout=60)
    keep_mid = f.submit("mid", priority=1)
    with pytest.raises(Full):
        f.submit("low-new")              # not above anything queued: refused, as on_full="reject" says
    high = f.submit("high", priority=2)  # evicts the lowest priority with the furthest deadline
    with pytest.raises(Full, match="evicted"):
        victim.result(10)
    blocker.release.set()
    assert [fut.result(10) for fut in (keep_low, keep_mid, high)] == ["low-soon", "mid", "high"]
    occupier.result(10)
    assert "low-far" not in served(blocker)
    s = f.stats()
    assert (s.rejected, s.failed, s.completed) == (1, 1, 4)
    f.close()


def test_drop_oldest_evicts_the_lowest_priority_and_refuses_a_lower_newcomer():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=8, max_delay=0, channel_cap=2, on_full="drop_oldest")
    occupier = occupy(f)
    high = f.submit("high-old", priority=1)
    low = f.submit("low")
    new = f.submit("new")                 # same priority as the lowest: it evicts it (drop_oldest)
    with pytest.raises(Full, match="evicted"):
        low.result(10)
    with pytest.raises(Full):
        f.submit("lower", priority=-1)    # lower than everything queued: refused itself
    blocker.release.set()
    assert (high.result(10), new.result(10)) == ("high-old", "new")
    occupier.result(10)
    f.close()


def test_nothing_is_lost_under_mixed_priorities_and_timeouts(rand):
    f = batched_fn(lambda b: time.sleep(0.002) or [x * 2 for x in b], max_batch_size=8, max_delay=0.001,
                   channel_cap=64)
    outcomes = mixed_priority_load(f, rand, callers=6, calls=150)
    f.close()
    assert len(outcomes) == 900
    for x, out in outcomes.items():
        assert out in (TimeoutError, Full) or out == 2 * x, (x, out)
    s = f.stats()
    assert s.submitted + s.rejected == 900
    assert s.submitted == s.completed + s.failed + s.timed_out + s.cancelled
    assert s.timed_out == s.late + s.expired and (s.queued, s.running) == (0, 0)
    assert s.completed == sum(1 for out in outcomes.values() if out not in (TimeoutError, Full))


def test_classic_mode_keeps_arrival_order():
    api._CLASSIC = True
    try:
        blocker = Blocker()
        f = batched_fn(blocker, max_batch_size=1, max_delay=0)
    finally:
        api._CLASSIC = False
    occupier = occupy(f)
    futures = [f.submit("a"), f.submit("b", priority=5), f.submit("c", priority=9)]
    blocker.release.set()
    for fut in futures:
        fut.result(10)
    occupier.result(10)
    assert served(blocker) == ["a", "b", "c"]
    f.close()


def test_a_remote_call_carries_its_priority(run_async):
    blocker = Blocker()
    fn = batched_fn(blocker, max_batch_size=1, max_delay=0)
    fn.share(unique_name())
    remote = connect(fn._share_owner.name, timeout=5)
    try:
        pinned = remote.submit("occupier")
        wait_until(lambda: fn.stats().running == 1)
        low = remote.submit("low")
        wait_until(lambda: fn.stats().queued == 1)
        mid = remote.submit("mid", priority=1)
        wait_until(lambda: fn.stats().queued == 2)

        async def main():
            task = asyncio.ensure_future(remote.acall("top", priority=3))
            while fn.stats().queued < 3:
                await asyncio.sleep(0.001)
            blocker.release.set()
            return await task

        assert run_async(main()) == "top"
        assert (low.result(10), mid.result(10), pinned.result(10)) == ("low", "mid", "occupier")
        assert served(blocker) == ["top", "mid", "low"]
        with pytest.raises(TypeError, match="invalid priority value"):
            remote("x", priority=True)
        with pytest.raises(ValueError, match="invalid priority value"):
            remote.submit("x", priority=2**40)
    finally:
        remote.close()
        fn.close(timeout=5)


def test_the_core_forms_batches_by_priority_then_deadline_then_arrival():
    from concurrent.futures import Future

    from batched_fn._batchcore import Channel

    chan = Channel(0, 2, 0.0)
    specs = [("a", None, 0), ("b", 30.0, 0), ("c", None, 1), ("d", 60.0, 1), ("e", 20.0, 1), ("f", None, -1)]
    futures = {v: Future() for v, _, _ in specs}
    for v, timeout, priority in specs:
        chan.submit_future(v, futures[v], timeout, 0.0, priority)
    batches = []
    while chan.queued:
        batch, _, _, _ = chan.collect()
        batches.append([req.value for req in batch])
        chan.deliver(batch, [req.value for req in batch], None)
    # who goes in each batch: priority 1 by deadline (e, d, then c without one), then priority 0
    # (b has a deadline, a none), then f; inside a batch, arrival order
    assert batches == [["d", "e"], ["b", "c"], ["a", "f"]]
    assert all(fut.result(0) == v for v, fut in futures.items())
