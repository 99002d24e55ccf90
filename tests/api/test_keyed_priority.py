"""batch_key= with priority= and whole-call timeout= (GUIDE §11 and §12 together).

Each key's queue is a scheduler queue: inside a key, batches form by priority,
then deadline, then arrival; which key goes next stays the keyed rule (a key
with a full batch at once, else the key whose oldest request is oldest), and
keys never share a batch.  Order is observed with the worker pinned in a first
batch, so everything queued meanwhile is served once it is released.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

import batched_fn._api as api
from batched_fn import Full, batched_fn
from helpers import mixed_priority_load, stats_balance, wait_until

MSG_LATE = re.escape("request's batch did not finish before its timeout")


def key_of(x: str) -> str:
    """The key of the inputs here: what comes before the first '-'."""
    return x.split("-")[0]


class Gated:
    """A handler whose batches of the gated keys wait for their gate; records every batch."""

    def __init__(self, *gated: str, sleep: float = 0.0) -> None:
        self.gates = {k: threading.Event() for k in gated}
        self.inside = {k: threading.Event() for k in gated}
        self.batches: list[list[str]] = []
        self.sleep = sleep

    def __call__(self, batch: list[str]) -> list[str]:
        self.batches.append(list(batch))
        key = key_of(batch[0])
        if key in self.gates:
            self.inside[key].set()
            assert self.gates[key].wait(10), "gate never opened"
        elif self.sleep:
            time.sleep(self.sleep)
        return list(batch)

    def pin(self, f, value: str = "pin-0"):
        """Submit value (a gated key) and wait until the worker is inside its batch."""
        fut = f.submit(value)
        assert self.inside[key_of(value)].wait(10), "the worker never took the pinned batch"
        return fut

    def served(self) -> list[list[str]]:
        """The batches after the pinned one."""
        return [b for b in self.batches if key_of(b[0]) != "pin"]


def test_inside_a_key_the_highest_priority_goes_first_and_keys_never_mix():
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=2, max_delay=0, batch_key=key_of)
    pinned = handler.pin(f)
    futures = [
        f.submit("a-low1"),
        f.submit("b-low1"),
        f.submit("a-low2"),
        f.submit("a-high1", priority=3),
        f.submit("b-high1", priority=1),
        f.submit("a-high2", priority=3),
        f.submit("a-mid", priority=1),
    ]
    handler.gates["pin"].set()
    assert [fut.result(10) for fut in futures] == ["a-low1", "b-low1", "a-low2", "a-high1", "b-high1",
                                                  "a-high2", "a-mid"]
    assert pinned.result(10) == "pin-0"
    # Both keys hold a full batch; key a's oldest request is the oldest, so a
    # goes first, twice (its oldest request stays older than b's), with its
    # best two each time, given to the handler in arrival order.
    assert handler.served() == [["a-high1", "a-high2"], ["a-low1", "a-mid"], ["b-low1", "b-high1"], ["a-low2"]]
    for batch in handler.batches:
        assert len({key_of(x) for x in batch}) == 1, batch
    s = f.stats()
    assert s.by_key["a"].batches == 3 and s.by_key["b"].batches == 1
    assert s.by_priority[3].answered == 2 and s.by_priority[1].answered == 2
    assert stats_balance(s) == 0
    f.close()


def test_the_earliest_deadline_goes_first_among_equal_priorities_of_a_key():
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=1, max_delay=0, batch_key=key_of)
    pinned = handler.pin(f)
    futures = [f.submit("a-none"), f.submit("a-far", timeout=60), f.submit("a-soon", timeout=30),
               f.submit("a-top", priority=1)]
    handler.gates["pin"].set()
    for fut in futures:
        fut.result(10)
    pinned.result(10)
    assert handler.served() == [["a-top"], ["a-soon"], ["a-far"], ["a-none"]]
    f.close()


def test_a_keyed_call_times_out_inside_its_running_batch_and_its_neighbour_gets_its_output():
    handler = Gated("pin", "a")
    f = batched_fn(handler, max_batch_size=4, max_delay=0, batch_key=key_of)
    pinned = handler.pin(f)
    slow = f.submit("a-slow")
    timed = f.submit("a-timed", timeout=0.5)
    other = f.submit("b-other", timeout=30)
    handler.gates["pin"].set()
    assert handler.inside["a"].wait(10)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=MSG_LATE):
        timed.result(10)                          # at its deadline, while its batch still runs
    assert time.monotonic() - start < 5
    assert not slow.done()
    assert f.stats().running == 1                 # the late request no longer counts as running
    handler.gates["a"].set()
    assert slow.result(10) == "a-slow" and other.result(10) == "b-other" and pinned.result(10) == "pin-0"
    assert handler.served() == [["a-slow", "a-timed"], ["b-other"]]
    s = f.stats()
    assert (s.late, s.timed_out, s.completed) == (1, 1, 3)
    assert s.by_priority[0].late == 1
    assert stats_balance(s) == 0
    f.close()


def test_a_full_keyed_queue_evicts_the_lowest_priority_with_the_furthest_deadline_across_keys():
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=8, max_delay=0, channel_cap=3, batch_key=key_of)
    pinned = handler.pin(f)
    keep_low = f.submit("a-lowsoon", timeout=30)
    victim = f.submit("b-lowfar", timeout=60)
    keep_mid = f.submit("a-mid", priority=1)
    with pytest.raises(Full):
        f.submit("b-lownew")                     # above nothing queued: refused (on_full="reject")
    high = f.submit("c-high", priority=2)        # evicts b's request, the worst of every key's queue
    with pytest.raises(Full, match="evicted"):
        victim.result(10)
    assert "b" not in f.stats().by_key or f.stats().by_key["b"].queued == 0
    handler.gates["pin"].set()
    assert [fut.result(10) for fut in (keep_low, keep_mid, high)] == ["a-lowsoon", "a-mid", "c-high"]
    pinned.result(10)
    assert sorted(map(sorted, handler.served())) == [["a-lowsoon", "a-mid"], ["c-high"]]
    s = f.stats()
    assert (s.rejected, s.failed, s.completed) == (1, 1, 4)       # the evicted request counts as failed
    assert stats_balance(s) == 0
    f.close()


def test_drop_oldest_on_a_keyed_queue_evicts_the_oldest_of_the_lowest_priority():
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=8, max_delay=0, channel_cap=3, on_full="drop_oldest",
                   batch_key=key_of)
    pinned = handler.pin(f)
    high = f.submit("a-high", priority=1)
    oldest_low = f.submit("b-low1")
    low = f.submit("a-low2")
    new = f.submit("c-new")                      # same priority as the lowest: the oldest of them goes
    with pytest.raises(Full, match="evicted"):
        oldest_low.result(10)
    with pytest.raises(Full):
        f.submit("b-lower", priority=-1)         # lower than everything queued: refused itself
    handler.gates["pin"].set()
    assert (high.result(10), low.result(10), new.result(10)) == ("a-high", "a-low2", "c-new")
    pinned.result(10)
    assert all("b-low1" not in b for b in handler.batches)
    f.close()


def test_a_withdrawn_keyed_request_leaves_its_keys_queue_at_once():
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=8, max_delay=0, channel_cap=3, batch_key=key_of)
    pinned = handler.pin(f)
    expiring = f.submit("a-expiring", timeout=0.2)
    cancelled = f.submit("a-cancelled")
    kept = f.submit("a-kept", timeout=60)       # a call with a deadline files what is queued under its key
    assert cancelled.cancel()
    with pytest.raises(TimeoutError):
        expiring.result(10)
    s = f.stats()
    assert s.queued == 1 and s.by_key["a"].queued == 1 and s.timed_out == 1 and s.cancelled == 1
    more = [f.submit(f"b-{i}") for i in range(2)]   # the withdrawn ones' room is free again
    handler.gates["pin"].set()
    assert kept.result(10) == "a-kept" and [m.result(10) for m in more] == ["b-0", "b-1"]
    pinned.result(10)
    assert handler.served() == [["a-kept"], ["b-0", "b-1"]]
    assert stats_balance(f.stats()) == 0
    f.close()


def test_shedding_counts_the_keys_served_before_a_keyed_call():
    # Every batch of key a takes 0.2 s (one input each).  With five a's queued,
    # a high-priority a goes first in its key and is admitted; a call of key b
    # waits behind every older key whatever its priority, so it is shed.
    handler = Gated("pin", sleep=0.2)
    f = batched_fn(handler, max_batch_size=1, max_delay=0, batch_key=key_of, channel_cap=64)
    assert [f(f"w-{i}") for i in range(2)] == ["w-0", "w-1"]     # the estimate learns 0.2 s a batch
    pinned = handler.pin(f)
    queued = [f.submit(f"a-{i}") for i in range(5)]
    first = f.submit("a-first", priority=1, timeout=0.9)
    with pytest.raises(Full, match="shed") as info:
        f.submit("b-late", priority=5, timeout=0.9)
    assert info.value.retry_after > 0
    handler.gates["pin"].set()
    assert first.result(10) == "a-first"
    assert [q.result(10) for q in queued] == [f"a-{i}" for i in range(5)]
    pinned.result(10)
    assert handler.served()[2] == ["a-first"]       # after the two warm-up batches
    s = f.stats()
    assert s.shed == 1 and s.by_priority[5].shed == 1 and s.by_priority[1].answered == 1
    f.close()


def test_nothing_is_lost_with_keys_priorities_and_timeouts(rand):
    f = batched_fn(lambda b: time.sleep(0.001) or [x * 2 for x in b], max_batch_size=4, max_delay=0.001,
                   channel_cap=32, batch_key=lambda x: x % 5)
    outcomes = mixed_priority_load(f, rand, callers=5, calls=120)
    assert len(outcomes) == 5 * 120
    for x, out in outcomes.items():
        assert out in (TimeoutError, Full) or out == x * 2, (x, out)
    wait_until(lambda: f.stats().running == 0 and f.stats().queued == 0, 5, "the queue drained")
    s = f.stats()
    assert stats_balance(s) == 0
    assert s.completed == sum(1 for out in outcomes.values() if out not in (TimeoutError, Full))
    f.close()


def test_a_keys_queue_grows_and_keeps_its_order(rand):
    # More requests in one key than its queue's first table holds, in random priorities.
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=10, max_delay=0, batch_key=key_of, priority_aging=None)
    pinned = handler.pin(f)
    priorities = [rand.randrange(-3, 4) for _ in range(100)]
    futures = [f.submit(f"a-{i}", priority=p) for i, p in enumerate(priorities)]
    handler.gates["pin"].set()
    assert [fut.result(10) for fut in futures] == [f"a-{i}" for i in range(100)]
    pinned.result(10)
    served = handler.served()
    assert [len(b) for b in served] == [10] * 10
    order = sorted(range(100), key=lambda i: (-priorities[i], i))    # priority, then arrival
    assert [sorted(b) for b in served] == [sorted(f"a-{i}" for i in order[k:k + 10]) for k in range(0, 100, 10)]
    f.close()


def test_classic_mode_keeps_arrival_order_inside_a_key(monkeypatch):
    monkeypatch.setattr(api, "_CLASSIC", True)
    handler = Gated("pin")
    f = batched_fn(handler, max_batch_size=2, max_delay=0, batch_key=key_of)
    monkeypatch.setattr(api, "_CLASSIC", False)
    pinned = handler.pin(f)
    futures = [f.submit("a-1"), f.submit("b-1", priority=9), f.submit("a-2", priority=5), f.submit("a-3", priority=9)]
    handler.gates["pin"].set()
    for fut in futures:
        fut.result(10)
    pinned.result(10)
    assert handler.served() == [["a-1", "a-2"], ["b-1"], ["a-3"]]
    f.close()
