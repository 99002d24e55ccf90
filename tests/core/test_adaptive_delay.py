"""max_delay="auto": the policy's decisions on a fake clock, its knobs, and real batches end to end.

The policy (src/batchcore/delay.h) is driven through the test-only class
batched_fn._batchcore.DelayPolicy with explicit timestamps; no wall-clock time is asserted.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import re
import threading
from typing import Any

import pytest

from batched_fn import BatchInfo, batched_fn
from batched_fn._batchcore import DelayPolicy

US = 1_000
MS = 1_000_000
T0 = 1_000 * MS          # the fake clock starts here (any positive time)
MAX_ITEMS = 32


def handler_ns(n: int) -> int:
    """The modelled handler: 2 ms + 50 us per input."""
    return 2 * MS + 50 * US * n


def warm(policy: DelayPolicy, sizes: range = range(1, 9)) -> None:
    """Teach the policy the handler's cost at a few batch sizes."""
    for n in sizes:
        policy.record(n, handler_ns(n))


class Sim:
    """One worker using the policy the way Channel.collect does, on a fake clock.

    Arrivals are pending times; a collect takes those due, asks decide(), and
    sleeps until the time it returns or until the batch reaches target().
    """

    def __init__(self, cap_ns: int = 10 * MS) -> None:
        self.policy = DelayPolicy(cap_ns)
        self.pending: list[int] = []
        self.now = T0
        self.sizes: list[int] = []
        self.waits: list[int] = []      # per batch: dispatch time - when it could first run

    def add(self, t: int) -> None:
        heapq.heappush(self.pending, t)

    def batch(self) -> list[int]:
        """Collect and run one batch; return the arrival times in it."""
        start = self.now
        taken: list[int] = []
        while True:
            while self.pending and self.pending[0] <= self.now and len(taken) < MAX_ITEMS:
                t = heapq.heappop(self.pending)
                taken.append(t)
                self.policy.arrival(t)
            if not taken:
                self.now = self.pending[0]       # idle until the next arrival
                continue
            since = max(taken[0], start)
            if len(taken) >= MAX_ITEMS:
                break
            wake = self.policy.decide(self.now, len(taken), since)
            if wake < 0:
                break
            assert wake > self.now
            need = self.policy.target(MAX_ITEMS) - len(taken)
            due = heapq.nsmallest(max(need, 1), self.pending)
            self.now = min(wake, due[-1]) if len(due) >= need > 0 else wake
        self.waits.append(self.now - max(taken[0], start))
        self.sizes.append(len(taken))
        ran = handler_ns(len(taken))
        self.policy.record(len(taken), ran)
        self.now += ran
        return taken


def closed_loop(callers: int, batches: int = 300, resubmit_ns: int = 25 * US, seed: int = 1) -> Sim:
    """callers that each send again resubmit_ns-ish after their answer (jittered, in turn)."""
    rng = random.Random(seed)
    sim = Sim()
    for k in range(callers):
        sim.add(T0 + (k + 1) * resubmit_ns)
    for _ in range(batches):
        done = sim.batch()
        for k in range(len(done)):
            sim.add(sim.now + (k + 1) * resubmit_ns + rng.randrange(resubmit_ns // 2))
    return sim


def open_loop(rate_per_s: float, batches: int = 400, seed: int = 1) -> Sim:
    """Poisson arrivals at rate_per_s, whatever the worker does."""
    rng = random.Random(seed)
    sim = Sim()
    t = T0
    for _ in range(batches * MAX_ITEMS):
        t += int(rng.expovariate(rate_per_s) * 1e9)
        sim.add(t)
    for _ in range(batches):
        sim.batch()
    return sim


# ------------------------------------------------------------- the model


def test_fit_finds_the_fixed_cost_of_a_batch() -> None:
    policy = DelayPolicy(10 * MS)
    assert policy.fixed_ns == 0.0          # nothing seen yet
    warm(policy, range(1, 33))
    assert policy.fixed_ns == pytest.approx(2 * MS, rel=0.01)


def test_batches_all_of_one_size_count_their_whole_time_as_fixed() -> None:
    policy = DelayPolicy(10 * MS)
    for _ in range(5):
        policy.record(4, handler_ns(4))
    assert policy.fixed_ns == pytest.approx(handler_ns(4))


def test_a_handler_without_fixed_cost_never_waits() -> None:
    policy = DelayPolicy(10 * MS)
    for n in range(1, 17):
        policy.record(n, 100 * US * n)       # cost per input only: nothing to share
    for i in range(10):
        policy.arrival(T0 + i * 5 * US)      # a fast stream
    assert policy.decide(T0 + 50 * US, 1, T0) == -1


# ------------------------------------------------------------- decisions


def test_a_fresh_policy_dispatches_at_once() -> None:
    policy = DelayPolicy(10 * MS)
    policy.arrival(T0)
    assert policy.decide(T0, 1, T0) == -1
    assert policy.target(MAX_ITEMS) == 1


def test_one_closed_loop_caller_is_never_kept_waiting() -> None:
    sim = closed_loop(callers=1)
    assert set(sim.sizes) == {1}
    assert set(sim.waits) == {0}            # like max_delay=0
    assert sim.policy.hit < 0.05


@pytest.mark.parametrize("callers", [2, 4, 16])
def test_closed_loop_callers_are_gathered_into_one_batch(callers: int) -> None:
    sim = closed_loop(callers)
    late = sim.sizes[len(sim.sizes) // 2:]
    assert min(late) == max(late) == callers
    # it waits for the burst and a short silence after it, far less than a handler run
    assert max(sim.waits[len(sim.waits) // 2:]) < handler_ns(callers) // 2


def test_a_lone_caller_is_not_kept_waiting_after_one_long_batch() -> None:
    # one slow batch (1 s) among fast ones (50 us) inflates the fitted fixed
    # cost for a while; the lone caller's next calls must still run at once
    policy = DelayPolicy(10 * MS)
    now = T0
    held = []
    for i in range(80):
        start = now                              # the worker is free and idle from here
        t = start + 300 * US                     # the lone caller's next call
        policy.arrival(t)
        wake = policy.decide(t, 1, max(t, start))
        if wake >= 0:
            held.append(i)
        ran = 1_000 * MS if i == 20 else 50 * US
        policy.record(1, ran)
        now = t + ran
    assert held == [], f"lone calls held after the long batch: {held}"


def test_a_burst_wait_ends_after_a_silence() -> None:
    policy = DelayPolicy(10 * MS)
    warm(policy)
    t = T0
    for _ in range(20):                     # bursts of 4 arrivals 30 us apart, 2.3 ms between
        for k in range(4):
            policy.arrival(t + k * 30 * US)
        t += 2300 * US
    policy.arrival(t)
    wake = policy.decide(t, 1, t)
    assert wake == t + int(policy.window_ns)
    assert 20 * US <= policy.window_ns <= 200 * US
    policy.arrival(t + 30 * US)
    again = policy.decide(t + 40 * US, 2, t)
    assert again == t + 30 * US + int(policy.window_ns)     # the silence counts from the last arrival
    assert policy.decide(again, 2, t) == -1


def test_the_wait_never_passes_auto_max_delay() -> None:
    policy = DelayPolicy(100 * US)
    warm(policy)
    for i in range(30):
        policy.arrival(T0 + i * 80 * US)     # a stream every 80 us: a window of 160 us
    now = T0 + 29 * 80 * US
    assert policy.window_ns > 100 * US
    assert policy.decide(now, 1, now) == now + 100 * US
    assert policy.decide(now + 100 * US, 1, now) == -1


def test_auto_max_delay_zero_never_waits() -> None:
    policy = DelayPolicy(0)
    warm(policy)
    for i in range(30):
        policy.arrival(T0 + i * 30 * US)     # a burst that would be worth waiting for
    now = T0 + 29 * 30 * US
    assert policy.decide(now, 1, now) == -1


def test_the_wait_never_passes_the_fixed_cost() -> None:
    policy = DelayPolicy(10 * MS)
    warm(policy)
    for i in range(40):
        policy.arrival(T0 + i * 900 * US)    # slow arrivals: the window is capped at a
    now = T0 + 39 * 900 * US
    wake = policy.decide(now, 1, now)
    assert wake == -1 or wake - now <= policy.fixed_ns


def test_target_is_where_waiting_stops_paying() -> None:
    policy = DelayPolicy(10 * MS)
    warm(policy)
    for i in range(60):
        policy.arrival(T0 + i * 400 * US)   # a steady 2.5k/s: about 5 inputs per fixed cost
    now = T0 + 59 * 400 * US
    target = policy.target(MAX_ITEMS)
    assert 2 <= target <= 6
    assert policy.decide(now, target - 1, now) > now
    assert policy.decide(now, target, now) == -1


def test_open_loop_light_load_dispatches_at_once() -> None:
    sim = open_loop(rate_per_s=200)          # 0.4 arrivals per fixed cost
    assert max(sim.waits[50:]) == 0


def test_open_loop_heavy_load_runs_like_no_delay() -> None:
    # 80 % of the batch-32 capacity: the queue refills while a batch runs,
    # so batches leave full-ish and almost never wait
    capacity = MAX_ITEMS / (handler_ns(MAX_ITEMS) / 1e9)
    sim = open_loop(rate_per_s=0.8 * capacity)
    waited = [w for w in sim.waits[50:] if w > 0]
    assert len(waited) <= len(sim.waits[50:]) // 10
    assert sum(sim.sizes[50:]) / len(sim.sizes[50:]) > 10


# ------------------------------------------------------------- knobs


def handler(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


def test_auto_is_accepted_with_its_bound() -> None:
    f = batched_fn(handler, max_delay="auto", auto_max_delay=0.002)
    try:
        assert f.config.max_delay == "auto"
        assert f.config.auto_max_delay == 0.002
    finally:
        f.close()


def test_auto_max_delay_defaults_to_ten_ms() -> None:
    f = batched_fn(handler, max_delay="auto")
    try:
        assert f.config.auto_max_delay == 0.01
    finally:
        f.close()


def test_another_string_for_max_delay_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "invalid max_delay value: expected a finite float >= 0 or 'auto' (got 'fast')")):
        batched_fn(handler, max_delay="fast")    # type: ignore[call-overload]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_auto_max_delay_is_checked_like_max_delay(bad: float) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"invalid auto_max_delay value: expected a finite float >= 0 (got {bad!r})")):
        batched_fn(handler, max_delay="auto", auto_max_delay=bad)


def test_auto_max_delay_must_be_a_number() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "invalid auto_max_delay value: expected a finite float >= 0 (got '1ms')")):
        batched_fn(handler, max_delay="auto", auto_max_delay="1ms")  # type: ignore[call-overload]


def test_auto_max_delay_without_auto_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "auto_max_delay goes with max_delay='auto' (got max_delay=0.005, auto_max_delay=0.002)")):
        batched_fn(handler, max_delay=0.005, auto_max_delay=0.002)


# ------------------------------------------------------------- end to end


def test_fixed_delay_reports_itself_as_the_delay() -> None:
    infos: list[BatchInfo] = []
    f = batched_fn(handler, max_delay=0.003, on_batch=infos.append)
    try:
        assert f(4) == 8
    finally:
        f.close()
    assert [i.delay for i in infos] == [0.003]
    assert f.stats().mean_delay == pytest.approx(0.003)


def check_batches(infos: list[BatchInfo], total: int, bound: float) -> None:
    assert sum(i.size for i in infos) == total
    assert all(1 <= i.size <= 8 for i in infos)
    assert all(0.0 <= i.delay <= bound for i in infos)
    assert all(i.reason in ("full", "delay", "drain") for i in infos)


@pytest.mark.parametrize("workers", [1, 2])
def test_auto_runs_correct_batches_for_threads(workers: int) -> None:
    infos: list[BatchInfo] = []

    def slow(xs: list[int]) -> list[int]:
        threading.Event().wait(0.001)      # a fixed cost per batch worth sharing
        return [2 * x for x in xs]

    f = batched_fn(slow, max_batch_size=8, max_delay="auto", auto_max_delay=0.004, num_workers=workers,
                   on_batch=infos.append)
    results: dict[int, list[tuple[int, int]]] = {}

    def caller(k: int) -> None:
        results[k] = [(k * 1000 + i, f(k * 1000 + i)) for i in range(60)]

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        f.close()
    assert all(out == 2 * x for pairs in results.values() for x, out in pairs)
    assert sum(len(p) for p in results.values()) == 360
    check_batches(infos, 360, 0.004)
    stats = f.stats()
    assert stats.completed == 360 and 0.0 <= stats.mean_delay <= 0.004


def test_auto_runs_correct_batches_for_asyncio(run_async: Any) -> None:
    infos: list[BatchInfo] = []

    async def main() -> list[int]:
        f = batched_fn(handler, max_batch_size=8, max_delay="auto", auto_max_delay=0.004, on_batch=infos.append)
        try:
            outs: list[int] = []
            for _ in range(5):
                outs += await asyncio.gather(*(f.acall(i) for i in range(40)))
            return outs
        finally:
            f.close()

    outs = run_async(main())
    assert outs == [2 * i for i in range(40)] * 5
    check_batches(infos, 200, 0.004)


def test_auto_keeps_deadlines() -> None:
    # a short timeout still gets its answer: the auto wait never outlasts it
    f = batched_fn(handler, max_delay="auto", auto_max_delay=5.0)
    try:
        for i in range(20):
            assert f(i, timeout=2.0) == 2 * i
    finally:
        f.close()
