"""Shedding by prediction (GUIDE §11): a call that by the handler estimate would finish after its
deadline fails at once with Full carrying retry_after; counters by priority; recovery after a burst.

No speed is asserted: "at once" is checked as "before the work ahead of it was done".
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from _shared_tools import unique_name
from batched_fn import Full, batched_fn, connect
from helpers import wait_until

MSG_SHED = "^" + re.escape("request shed: by the handler estimate it would finish after its deadline (")


class Paced:
    """Handler: `seconds[0]` per batch (GIL released); records batches; the first may hold on a gate."""

    def __init__(self, seconds: float, hold_first: bool = False) -> None:
        self.seconds = [seconds]
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.inside = 0            # batches in the handler now
        if not hold_first:
            self.gate.set()

    def __call__(self, batch):
        self.inside += 1
        self.batches.append(list(batch))
        time.sleep(self.seconds[0])
        assert self.gate.wait(10)
        self.inside -= 1
        return list(batch)


def _backlog(f, n: int) -> list:
    """One batch running and n requests (priority 0, no deadline) queued behind it."""
    running = f.submit("running")
    wait_until(lambda: f.stats().running == 1)
    queued = [f.submit(f"q{i}") for i in range(n)]
    wait_until(lambda: f.stats().queued == n)
    return [running, *queued]


def test_a_call_that_cannot_finish_in_time_is_shed_at_once_with_retry_after():
    handler = Paced(0.2)
    f = batched_fn(handler, max_batch_size=1, max_delay=0)
    f("warm-up")                                   # the estimate learns: ~0.2 s a batch
    handler.gate.clear()                           # the next batch holds until we say
    backlog = _backlog(f, 3)                       # ~0.2 s left + 3 batches + its own: ~1 s
    with pytest.raises(Full, match=MSG_SHED) as info:
        f("hurried", timeout=0.3)
    assert not any(fut.done() for fut in backlog)  # refused before the work ahead of it was done
    assert info.value.queued == 3
    assert 0.3 < info.value.retry_after < 5.0      # ~0.7 s: when that work will have drained enough
    s = f.stats()
    assert (s.shed, s.rejected, s.submitted) == (1, 1, 5)
    assert s.by_priority[0].shed == 1
    handler.gate.set()
    assert [fut.result(10) for fut in backlog] == ["running", "q0", "q1", "q2"]
    assert "hurried" not in [x for b in handler.batches for x in b]
    f.close()


def test_a_higher_priority_call_is_not_shed_for_lower_work_queued():
    handler = Paced(0.2)
    f = batched_fn(handler, max_batch_size=1, max_delay=0)
    f("warm-up")
    backlog = _backlog(f, 5)                       # ~1.2 s of priority-0 work
    assert f("urgent", timeout=2.0, priority=1) == "urgent"   # only the running batch is ahead of it
    assert not backlog[-1].done()
    with pytest.raises(Full, match=MSG_SHED):
        f("same priority", timeout=0.5)            # behind all of it
    for fut in backlog:
        fut.result(10)
    s = f.stats()
    assert (s.by_priority[1].answered, s.by_priority[0].shed) == (1, 1)
    assert handler.batches.index(["urgent"]) == 2  # right after the running batch
    f.close()


def test_a_priority_0_call_is_shed_sooner_while_higher_priorities_take_the_worker():
    # The same backlog and timeout: admitted where the worker has served only
    # priority 0, shed where higher priorities took most of its time (they
    # will keep going first while this call waits).
    admitted_or_shed = {}
    for warm_priority in (0, 1):
        handler = Paced(0.05)
        f = batched_fn(handler, max_batch_size=1, max_delay=0)
        for i in range(12):
            f(f"warm{i}", priority=warm_priority)  # ~0.05 s a batch; 12 batches at this priority
        handler.gate.clear()
        backlog = _backlog(f, 2)                   # ~0.05 s left + 2 batches + its own: ~0.2 s
        try:
            backlog.append(f.submit("probe", timeout=0.4))
            admitted_or_shed[warm_priority] = "admitted"
        except Full as e:
            assert re.match(MSG_SHED, str(e))
            admitted_or_shed[warm_priority] = "shed"
        handler.gate.set()
        for fut in backlog:
            fut.result(10)
        assert f.stats().by_priority[0].shed == (admitted_or_shed[warm_priority] == "shed")
        f.close()
    assert admitted_or_shed == {0: "admitted", 1: "shed"}


def test_one_stalled_batch_between_normal_ones_does_not_shed_the_calls_after_it():
    # A batch held up (as when the OS does not run the worker) must not make
    # the calls arriving just after it look doomed: the batch before it
    # still says how fast the handler is.
    handler = Paced(0.02)
    f = batched_fn(handler, max_batch_size=1, max_delay=0)
    for i in range(8):
        f(f"warm{i}")                              # ~0.02 s a batch
    handler.seconds[0] = 1.0
    f("stalled")                                   # one batch of 1 s
    handler.seconds[0] = 0.02
    handler.gate.clear()
    backlog = _backlog(f, 2)                       # by the normal batches: ~0.1 s ahead of the probe
    backlog.append(f.submit("probe", timeout=0.4))   # by the stalled one ~0.9 s: shed
    handler.gate.set()
    assert [fut.result(10) for fut in backlog] == ["running", "q0", "q1", "probe"]
    assert f.stats().shed == 0
    f.close()


def test_an_idle_worker_always_admits_whatever_the_estimate():
    handler = Paced(0.3)
    f = batched_fn(handler, max_batch_size=1, max_delay=0)
    f("slow")                                      # the estimate: 0.3 s
    handler.seconds[0] = 0.0
    assert f("quick", timeout=0.05) == "quick"     # nothing ahead: it runs and is measured
    assert f.stats().shed == 0
    f.close()


def test_admission_recovers_within_a_few_batches_after_a_burst_slower_than_every_estimate():
    handler = Paced(0.001)
    f = batched_fn(handler, max_batch_size=4, max_delay=0)
    for i in range(5):
        f(i, timeout=1.0)                          # the estimate: ~1 ms
    # A burst: every batch now takes 1 s, far beyond the estimate and the calls' timeouts.
    handler.seconds[0] = 1.0
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        for i in range(4):
            try:
                f((k, i), timeout=0.3)
                got = "ok"
            except TimeoutError:
                got = "timeout"
            except Full:
                got = "full"
            with lock:
                outcomes.append(got)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 16 and "ok" not in outcomes   # nothing could finish in 0.3 s
    s = f.stats()
    assert s.late >= 1 and s.late + s.expired + s.shed == 16   # late at first, then expired or shed
    handler.seconds[0] = 0.001                     # the burst is over
    # (its last batch may still run with no caller left: `running` is 0 already)
    wait_until(lambda: handler.inside == 0 and f.stats().queued == 0)
    results = []
    for i in range(20):
        try:
            results.append(f(i, timeout=0.3))
        except (Full, TimeoutError) as exc:
            results.append(type(exc))
    # admission recovers within a few batches, and stays open
    assert results[5:] == list(range(5, 20)), results
    f.close()


def test_acall_and_submit_are_shed_too(run_async):
    handler = Paced(0.2)
    f = batched_fn(handler, max_batch_size=1, max_delay=0)
    f("warm-up")
    handler.gate.clear()
    backlog = _backlog(f, 3)

    async def main():
        with pytest.raises(Full, match=MSG_SHED):
            await f.acall("hurried", timeout=0.3)

    run_async(main())
    with pytest.raises(Full, match=MSG_SHED):
        f.submit("hurried", timeout=0.3)
    assert f.stats().shed == 2
    handler.gate.set()
    for fut in backlog:
        fut.result(10)
    f.close()


def test_on_full_block_waits_instead_of_shedding():
    handler = Paced(0.2)
    f = batched_fn(handler, max_batch_size=1, max_delay=0, on_full="block")
    f("warm-up")
    backlog = _backlog(f, 3)
    with pytest.raises(TimeoutError):
        f("hurried", timeout=0.3)
    assert f.stats().shed == 0
    for fut in backlog:
        fut.result(10)
    f.close()


def test_classic_mode_never_sheds():
    import batched_fn._api as api
    api._CLASSIC = True
    try:
        handler = Paced(0.2)
        f = batched_fn(handler, max_batch_size=1, max_delay=0)
    finally:
        api._CLASSIC = False
    f("warm-up")
    backlog = _backlog(f, 3)
    with pytest.raises(TimeoutError, match="not taken into a batch"):
        f("hurried", timeout=0.3)
    assert f.stats().shed == 0
    for fut in backlog:
        fut.result(10)
    f.close()


def test_a_remote_call_is_shed_with_retry_after():
    handler = Paced(0.2)
    fn = batched_fn(handler, max_batch_size=1, max_delay=0)
    fn.share(unique_name())
    remote = connect(fn._share_owner.name, timeout=5)
    try:
        remote("warm-up")
        handler.gate.clear()
        backlog = _backlog(fn, 3)
        with pytest.raises(Full, match=MSG_SHED) as info:
            remote("hurried", timeout=0.3, priority=0)
        assert info.value.retry_after > 0.3
        assert remote.submit("urgent", timeout=5.0, priority=2) is not None
        handler.gate.set()
        for fut in backlog:
            fut.result(10)
        assert fn.stats().shed == 1
    finally:
        remote.close()
        fn.close(timeout=5)


def test_outcomes_by_priority_add_up_under_a_mixed_flood(rand):
    handler = Paced(0.004)
    f = batched_fn(handler, max_batch_size=8, max_delay=0.001)
    counts: dict[int, dict[str, int]] = {0: {}, 1: {}}
    lock = threading.Lock()

    def caller(k: int) -> None:
        r = type(rand)(rand.seed_value + k)
        for i in range(80):
            priority = 1 if r.random() < 0.2 else 0
            try:
                f((k, i), timeout=0.03, priority=priority)
                got = "ok"
            except Full:
                got = "shed"
            except TimeoutError:
                got = "timeout"
            with lock:
                counts[priority][got] = counts[priority].get(got, 0) + 1

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    f.close()
    s = f.stats()
    for p, got in counts.items():
        if not got:
            continue
        ps = s.by_priority[p]
        assert ps.answered == got.get("ok", 0)
        assert ps.shed == got.get("shed", 0)
        assert ps.late + ps.expired == got.get("timeout", 0)
    assert sum(sum(c.values()) for c in counts.values()) == 640
    assert s.shed == sum(ps.shed for ps in s.by_priority.values())


def test_prometheus_exports_outcomes_by_priority():
    prometheus_client = pytest.importorskip("prometheus_client")
    from batched_fn.prometheus import register

    handler = Paced(0.2)
    f = batched_fn(handler, max_batch_size=1, max_delay=0)
    registry = prometheus_client.CollectorRegistry()
    register(f, "slo", registry=registry)
    f("warm-up")
    f("high", priority=2, timeout=5)
    backlog = _backlog(f, 3)
    with pytest.raises(Full):
        f("hurried", timeout=0.3)
    for fut in backlog:
        fut.result(10)
    text = prometheus_client.generate_latest(registry).decode()
    assert 'slo_priority_outcomes_total{outcome="shed",priority="0"} 1.0' in text
    assert 'slo_priority_outcomes_total{outcome="answered",priority="2"} 1.0' in text
    f.close()
