"""Per-item outcomes, cost-aware batches, overflow policies, deadlines, dispatch reasons."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import batched_fn._api as api
from batched_fn import BatchInfo, Closed, Failed, Full, batched_fn
from conftest import MSG_NO_ROOM, MSG_FULL, MSG_TIMEOUT, assert_runs_under, wait_until


class Blocker:
    """Handler whose first batch blocks until release; records every batch."""

    def __init__(self, fn=lambda b: list(b)):
        self.fn = fn
        self.batches: list[list] = []
        self.release = threading.Event()
        self.first = True

    def __call__(self, batch):
        self.batches.append(list(batch))
        if self.first:
            self.first = False
            assert self.release.wait(10)
        return self.fn(batch)


def occupy(f):
    """Put the worker into its first (blocking) batch; return that call's future."""
    fut = f.submit("occupier")
    wait_until(lambda: f.stats().running == 1)
    return fut


# ---------------------------------------------------------------- Failed


def test_failed_fails_only_its_own_caller_with_the_same_exception_object():
    errors = {}

    def handler(batch):
        out = []
        for x in batch:
            if x % 2:
                errors[x] = ValueError(f"odd {x}")
                out.append(Failed(errors[x]))
            else:
                out.append(x * 10)
        return out

    f = batched_fn(handler, max_batch_size=64, max_delay=0.005)
    results: dict[int, object] = {}

    def caller(x):
        try:
            results[x] = f(x)
        except ValueError as exc:
            results[x] = exc

    threads = [threading.Thread(target=caller, args=(x,)) for x in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x in range(64):
        if x % 2:
            assert results[x] is errors[x]
        else:
            assert results[x] == x * 10
    s = f.stats()
    assert (s.completed, s.failed) == (32, 32)
    f.close()


def test_failed_keeps_its_traceback():
    def handler(batch):
        try:
            raise KeyError("deep")
        except KeyError as exc:
            return [Failed(exc)]

    with batched_fn(handler) as f:
        with pytest.raises(KeyError) as info:
            f(1)
    assert any(frame.name == "handler" for frame in __import__("traceback").extract_tb(info.value.__traceback__))


def test_failed_of_a_non_exception_is_a_type_error():
    with pytest.raises(TypeError, match=r"Failed\(\) expects an exception instance \(got 'oops'\)"):
        Failed("oops")  # type: ignore[arg-type]


def test_failed_reaches_asyncio_callers(run_async):
    f = batched_fn(lambda b: [Failed(RuntimeError(x)) if x == "bad" else x for x in b], max_delay=0.002)

    async def main():
        good, bad = await asyncio.gather(f.acall("good"), f.acall("bad"), return_exceptions=True)
        assert good == "good"
        assert isinstance(bad, RuntimeError) and bad.args == ("bad",)

    run_async(main())
    f.close()


# ---------------------------------------------------------------- cost


def test_every_batch_respects_count_and_cost_bounds():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=4, max_delay=0, cost=lambda x: x, max_batch_cost=12)
    first = f.submit(1)
    wait_until(lambda: f.stats().running == 1)
    futures = [f.submit(c) for c in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3]
    blocker.release.set()
    assert [fut.result(5) for fut in futures] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    first.result(5)
    for batch in blocker.batches[1:]:
        assert len(batch) <= 4
        assert sum(batch) <= 12 or len(batch) == 1
    # arrival order is kept across batches
    assert [x for b in blocker.batches[1:] for x in b] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    f.close()


@pytest.mark.parametrize("cost_value, message", [
    (13, "input cost 13 exceeds max_batch_cost 12.0"),
    (-1, "invalid cost value: expected a finite number >= 0 (got -1)"),
    ("3", "invalid cost value: expected a finite number >= 0 (got '3')"),
    (float("nan"), "invalid cost value: expected a finite number >= 0 (got nan)"),
])
def test_bad_costs_are_refused_at_submit_and_nothing_is_queued(cost_value, message):
    seen = []
    f = batched_fn(lambda b: seen.extend(b) or b, cost=lambda x: cost_value, max_batch_cost=12)
    with pytest.raises(ValueError) as info:
        f("x")
    assert str(info.value) == message
    assert f.stats().submitted == 0 and seen == []
    f.close()


def test_an_exception_in_cost_goes_to_that_caller_and_nothing_is_queued():
    def cost(x):
        raise LookupError("no cost for you")

    f = batched_fn(lambda b: b, cost=cost, max_batch_cost=5)
    with pytest.raises(LookupError, match="no cost for you"):
        f.submit("x")
    assert f.stats().submitted == 0
    f.close()


def test_cost_and_max_batch_cost_go_together():
    with pytest.raises(ValueError, match="cost and max_batch_cost go together"):
        batched_fn(lambda b: b, cost=len)
    with pytest.raises(ValueError, match="cost and max_batch_cost go together"):
        batched_fn(lambda b: b, max_batch_cost=3)


def test_batch_info_reports_the_cost():
    infos: list[BatchInfo] = []
    f = batched_fn(lambda b: b, cost=len, max_batch_cost=100, on_batch=infos.append, max_delay=0)
    with f:
        f("abcd")
    assert infos[0].cost == 4


# ---------------------------------------------------------------- on_full


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
    with pytest.raises(ValueError, match=r"invalid on_full value: expected one of 'reject', 'block', 'drop_oldest' \(got 'drop'\)"):
        batched_fn(lambda b: b, on_full="drop")


# ---------------------------------------------------------------- deadlines


def test_timeouts_fire_while_the_worker_is_busy_and_expired_inputs_never_run(run_async):
    seen = []
    f = batched_fn(lambda b: seen.extend(b) or time.sleep(0.5) or b, max_batch_size=8, max_delay=0)
    busy = f.submit("busy")
    wait_until(lambda: f.stats().running == 1)

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        f("blocking", timeout=0.05)
    blocking_s = time.monotonic() - start

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        f.submit("future", timeout=0.05).result(5)
    future_s = time.monotonic() - start

    async def main():
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
            await f.acall("async", timeout=0.05)
        return time.monotonic() - t0

    async_s = run_async(main())
    # long before the 0.5 s handler returns (the margin is for noisy machines)
    assert blocking_s < 0.25 and future_s < 0.25 and async_s < 0.25
    busy.result(5)
    f(0)
    assert seen == ["busy", 0]
    f.close()


def _deadline_load(aware: bool):
    infos: list[BatchInfo] = []
    api._DEADLINE_AWARE = aware
    try:
        f = batched_fn(lambda b: time.sleep(0.02) or b, max_batch_size=64, max_delay=0.2, on_batch=infos.append)
    finally:
        api._DEADLINE_AWARE = True
    for _ in range(2):          # warm up the handler-time estimate (no deadlines)
        f.submit("warm").result(5)
    outcomes = []
    futures = [f.submit(i, timeout=0.1) for i in range(8)]
    for fut in futures:
        try:
            outcomes.append(fut.result(5))
        except TimeoutError as exc:
            outcomes.append(exc)
    f.close()
    return outcomes, infos


def test_deadline_aware_close_lets_requests_meet_their_deadlines():
    outcomes, infos = _deadline_load(aware=True)
    assert outcomes == list(range(8))
    assert infos[-1].reason == "deadline"


def test_without_the_estimate_the_same_load_times_out():
    outcomes, infos = _deadline_load(aware=False)
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert all(info.reason != "deadline" for info in infos)


# ---------------------------------------------------------------- reasons, on_batch, healthy


def test_each_dispatch_reason_is_counted_exactly():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=4, max_delay=0.02)
    occupier = f.submit("occ")            # waits 20 ms alone, then blocks: delay
    wait_until(lambda: f.stats().running == 1)
    backlog = [f.submit(i) for i in range(6)]   # 4 = full, then 2 queued past their delay
    time.sleep(0.05)
    blocker.release.set()
    for fut in [occupier] + backlog:
        fut.result(5)
    wait_until(lambda: f.stats().batches == 3)
    counts = f.stats().batches_by_reason
    assert counts == {"full": 1, "delay": 1, "drain": 1, "deadline": 0, "close": 0}
    f.close()

    g = batched_fn(blocker.fn, max_batch_size=4, max_delay=10.0)
    futures = [g.submit(i) for i in range(2)]
    g.close()                              # the 10 s delay is cut short by close
    assert [x.result(5) for x in futures] == [0, 1]
    assert g.stats().batches_by_reason["close"] == 1


def test_on_batch_gets_batch_info_and_its_errors_are_logged_once(caplog):
    infos: list[BatchInfo] = []

    def on_batch(info):
        infos.append(info)
        raise RuntimeError("callback bug")

    f = batched_fn(lambda b: b, max_batch_size=2, max_delay=0, on_batch=on_batch)
    with caplog.at_level(logging.ERROR, logger="batched_fn"):
        for i in range(3):
            assert f(i) == i
    f.close()
    assert len(infos) == 3
    info = infos[0]
    assert (info.size, info.reason, info.worker) == (1, "drain", 0)
    assert info.handler_seconds >= 0 and info.oldest_wait >= 0
    with pytest.raises(AttributeError):
        info.size = 3  # type: ignore[misc]
    logged = [r for r in caplog.records if "callback raised RuntimeError" in r.getMessage()]
    assert len(logged) == 1


def test_stats_report_fill_and_percentiles():
    f = batched_fn(lambda b: time.sleep(0.001) or b, max_batch_size=4, max_delay=0.001)
    with f:
        futures = [f.submit(i) for i in range(40)]
        [x.result(5) for x in futures]
        s = f.stats()
    assert s.mean_fill == pytest.approx(s.mean_batch_size / 4)
    assert 0 < s.handler_p50 <= s.handler_p99
    assert 0 <= s.queue_wait_p50 <= s.queue_wait_p99


def test_healthy_tracks_workers_and_close():
    f = batched_fn(lambda b: b)
    f.start()
    assert f.healthy
    f.close()
    assert not f.healthy
