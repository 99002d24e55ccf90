"""timeout= bounds the caller's whole wait, queued or inside a running batch (GUIDE §11).

Timing bounds are generous (a shared, noisy machine): a 0.05 s timeout must
fire long before a handler of several tenths of a second returns.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from _shared_tools import unique_name
from batched_fn import Full, batched_fn, connect
from helpers import MSG_TIMEOUT, assert_runs_under, wait_until

MSG_LATE = re.escape("request's batch did not finish before its timeout")
MSG_PREDICTED = re.escape(
    "request not taken into a batch: by the handler estimate it could not finish before its timeout")


class Slow:
    """A handler that sleeps `seconds` per batch (GIL released) and records what it ran."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[list] = []
        self.started = threading.Event()

    def __call__(self, batch):
        self.batches.append(list(batch))
        self.started.set()
        time.sleep(self.seconds)
        return [("out", x) for x in batch]


def test_a_blocking_call_times_out_inside_its_running_batch_and_its_neighbours_get_their_outputs():
    slow = Slow(1.0)
    f = batched_fn(slow, max_batch_size=4, max_delay=0.05)
    neighbour = f.submit("neighbour")
    with assert_runs_under(0.8):
        with pytest.raises(TimeoutError, match=MSG_LATE):
            f("late", timeout=0.2)
    assert slow.batches == [["neighbour", "late"]]      # it was in the batch when its deadline came
    assert neighbour.result(10) == ("out", "neighbour")
    s = f.stats()
    assert (s.late, s.expired, s.timed_out, s.completed, s.running) == (1, 0, 1, 1, 0)
    assert s.submitted == s.completed + s.failed + s.timed_out + s.cancelled
    f.close()


def test_a_future_times_out_inside_its_running_batch():
    slow = Slow(1.0)
    f = batched_fn(slow, max_batch_size=4, max_delay=0)
    start = time.monotonic()
    fut = f.submit("late", timeout=0.05)
    with pytest.raises(TimeoutError, match=MSG_LATE):
        fut.result(10)
    assert time.monotonic() - start < 0.8 and slow.batches == [["late"]]
    wait_until(lambda: f.stats().running == 0 and f.stats().batches == 1)
    assert (f.stats().late, f.stats().completed) == (1, 0)      # the output came and was dropped
    f.close()


def test_acall_times_out_inside_its_running_batch(run_async):
    slow = Slow(1.0)
    f = batched_fn(slow, max_batch_size=4, max_delay=0)

    async def main():
        with assert_runs_under(0.8):
            with pytest.raises(TimeoutError, match=MSG_LATE):
                await f.acall("late", timeout=0.05)
        # the loop is free meanwhile, and later calls still work
        return await f.acall("after", timeout=10)

    assert run_async(main()) == ("out", "after")
    assert f.stats().late == 1
    f.close()


def test_a_queued_call_still_expires_with_the_queue_message():
    slow = Slow(0.5)
    f = batched_fn(slow, max_batch_size=1, max_delay=0)
    busy = f.submit("busy")
    assert slow.started.wait(5)
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        f("queued", timeout=0.05)
    busy.result(10)
    assert ["queued"] not in slow.batches
    assert (f.stats().expired, f.stats().late) == (1, 0)
    f.close()


def test_a_request_is_not_put_into_a_batch_the_estimate_says_cannot_finish_in_time():
    seconds = [0.3]
    seen: list = []
    f = batched_fn(lambda b: seen.extend(b) or time.sleep(seconds[0]) or b, max_batch_size=1, max_delay=0)
    f("warm-up")                            # the estimate learns: a batch takes ~0.3 s
    seconds[0] = 1.0                        # then the handler slows down
    busy = f.submit("busy")
    wait_until(lambda: f.stats().running == 1)
    # Admitted (by the estimate "busy" ends in ~0.3 s, well within 1.2 s), but
    # its turn comes after ~1 s, leaving ~0.2 s: too little for a ~0.3 s
    # batch, so it never runs.
    fut = f.submit("doomed", timeout=1.2)
    with pytest.raises(TimeoutError, match=MSG_PREDICTED):
        fut.result(10)
    busy.result(10)
    assert "doomed" not in seen
    s = f.stats()
    assert (s.expired, s.late, s.timed_out, s.shed) == (1, 0, 1, 0)
    assert s.by_priority[0].expired == 1
    f.close()


def test_an_estimate_longer_than_the_whole_timeout_is_not_trusted():
    # One slow batch teaches a 0.3 s estimate; the handler then turns fast.
    # A call of 0.1 s would be dropped by that estimate even on an idle
    # worker: it runs instead, and the estimate learns again.
    delay = [0.3]
    f = batched_fn(lambda b: time.sleep(delay[0]) or b, max_batch_size=1, max_delay=0)
    f("slow")
    delay[0] = 0.001
    assert [f(i, timeout=0.1) for i in range(5)] == list(range(5))
    assert f.stats().timed_out == 0
    f.close()


def test_a_remote_call_times_out_inside_its_running_batch():
    slow = Slow(1.0)
    fn = batched_fn(slow, max_batch_size=4, max_delay=0)
    fn.share(unique_name())
    remote = connect(fn._share_owner.name, timeout=5)
    try:
        with assert_runs_under(0.8):
            with pytest.raises(TimeoutError, match=MSG_LATE):
                remote("late", timeout=0.05)
        wait_until(lambda: fn.stats().handler_p50 > 0)     # the handler returned
        fut = remote.submit("late too", timeout=0.05)
        with pytest.raises(TimeoutError):
            fut.result(10)
        assert remote("after", timeout=10) == ("out", "after")
        assert fn.stats().late == 2
    finally:
        remote.close()
        fn.close(timeout=5)


def test_late_requests_leave_nothing_behind_under_load(rand):
    f = batched_fn(lambda b: time.sleep(rand.choice([0.001, 0.02])) or b, max_batch_size=8, max_delay=0.001)
    results: list[object] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        for i in range(60):
            try:
                out: object = f((k, i), timeout=0.01)
            except (TimeoutError, Full) as exc:
                out = type(exc)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    f.close()
    assert len(results) == 240
    s = f.stats()
    assert s.submitted == s.completed + s.timed_out and s.timed_out == s.late + s.expired
    assert s.submitted + s.rejected == 240 and s.rejected == s.shed == results.count(Full)
    assert s.completed == sum(1 for r in results if r not in (TimeoutError, Full))
    assert (s.running, s.queued) == (0, 0)


def test_cancelling_an_acall_inside_its_batch_discards_its_output(run_async):
    slow = Slow(0.3)
    f = batched_fn(slow, max_batch_size=4, max_delay=0)

    async def main():
        task = asyncio.ensure_future(f.acall("x", timeout=10))
        while not slow.started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(main())
    wait_until(lambda: f.stats().running == 0)
    assert f.stats().completed == 1 and f.stats().late == 0
    f.close()
