"""What a batched function tells: dispatch reasons, on_batch/BatchInfo, stats, healthy."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from batched_fn import BatchInfo, batched_fn
from helpers import (
    Blocker, wait_until,
)


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
