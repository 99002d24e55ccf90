"""batched_fn.prometheus: counters from stats(), histograms from batch listeners."""

from __future__ import annotations

import threading
import time

import pytest

from helpers import MSG_FULL

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from batched_fn import Failed, Full, batched_fn  # noqa: E402
from batched_fn.prometheus import register  # noqa: E402


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition text back, keyed by (sample name, sorted labels)."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_and_histograms_match_what_happened() -> None:
    gate = threading.Event()

    def handler(batch: list[int]) -> list[object]:
        gate.wait(5)
        return [Failed(ValueError("odd")) if x % 2 else x for x in batch]

    fn = batched_fn(handler, max_batch_size=4, max_delay=0.5, channel_cap=6)
    registry = CollectorRegistry()
    register(fn, "embed", registry=registry)
    with fn:
        first = fn.submit(0)                      # the worker takes it alone and waits on the gate
        deadline = time.monotonic() + 5
        while fn.stats().running == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        futures = [fn.submit(i) for i in range(1, 7)]   # queued: 6 = channel_cap
        with pytest.raises(Full, match=MSG_FULL):
            fn.submit(99)
        gate.set()
        results = [first] + futures
        outcomes = []
        for fut in results:
            try:
                fut.result(5)
                outcomes.append("ok")
            except ValueError:
                outcomes.append("failed")
        # the handler ran on batches of 1, 4 and 2 (max_batch_size=4, backlog drained at once)
        stats = fn.stats()
    got = samples(registry)
    assert outcomes.count("ok") == 4 and outcomes.count("failed") == 3
    assert got[("embed_requests_total", (("outcome", "completed"),))] == 4
    assert got[("embed_requests_total", (("outcome", "failed"),))] == 3
    assert got[("embed_requests_total", (("outcome", "rejected"),))] == 1
    assert got[("embed_requests_total", (("outcome", "timed_out"),))] == 0
    assert got[("embed_requests_total", (("outcome", "cancelled"),))] == 0
    by_reason = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == "embed_batches_total"}
    assert by_reason == {r: float(c) for r, c in stats.batches_by_reason.items()}
    assert sum(by_reason.values()) == stats.batches == 3
    # batch size histogram: buckets 1, 2, 4 (powers of two up to max_batch_size)
    assert got[("embed_batch_size_count", ())] == 3
    assert got[("embed_batch_size_sum", ())] == 7
    assert got[("embed_batch_size_bucket", (("le", "1.0"),))] == 1
    assert got[("embed_batch_size_bucket", (("le", "2.0"),))] == 2
    assert got[("embed_batch_size_bucket", (("le", "4.0"),))] == 3
    assert got[("embed_batch_size_bucket", (("le", "+Inf"),))] == 3
    # the first batch's handler waited on the gate, the others did not
    assert got[("embed_handler_seconds_count", ())] == 3
    assert got[("embed_queue_wait_seconds_count", ())] == 3
    assert got[("embed_handler_seconds_sum", ())] > 0
    assert got[("embed_queued", ())] == 0
    assert got[("embed_healthy", ())] == 0          # closed


def test_healthy_gauge_and_queued_while_running() -> None:
    fn = batched_fn(lambda b: b, max_batch_size=2)
    registry = CollectorRegistry()
    register(fn, "live", registry=registry)
    try:
        assert fn(3) == 3
        got = samples(registry)
        assert got[("live_healthy", ())] == 1
        assert got[("live_requests_total", (("outcome", "completed"),))] == 1
    finally:
        fn.close()


def test_two_functions_share_a_registry_under_different_names() -> None:
    a = batched_fn(lambda b: b, max_batch_size=2)
    b = batched_fn(lambda b: b, max_batch_size=8)
    registry = CollectorRegistry()
    register(a, "model_a", registry=registry)
    register(b, "model_b", registry=registry)
    with a, b:
        a(1)
        b(1)
        b(2)
        got = samples(registry)
    assert got[("model_a_requests_total", (("outcome", "completed"),))] == 1
    assert got[("model_b_requests_total", (("outcome", "completed"),))] == 2
    assert ("model_b_batch_size_bucket", (("le", "8.0"),)) in got


def test_name_taken_twice_is_refused_and_adds_no_listener() -> None:
    fn = batched_fn(lambda b: b)
    registry = CollectorRegistry()
    register(fn, "dup", registry=registry)
    listeners = len(fn._recorder.listeners)
    with pytest.raises(ValueError, match="dup"):
        register(fn, "dup", registry=registry)
    assert len(fn._recorder.listeners) == listeners
    fn.close()


@pytest.mark.parametrize("name", ["", "9lives", "has space", "dash-ed", None, 3])
def test_bad_name_is_refused_with_its_value(name: object) -> None:
    fn = batched_fn(lambda b: b)
    expected = r"invalid name value: expected a Prometheus metric name .*got " + repr(name).replace("(", r"\(")
    with pytest.raises(ValueError, match=expected):
        register(fn, name, registry=CollectorRegistry())  # type: ignore[arg-type]
    fn.close()


def test_collector_does_not_keep_the_function_alive() -> None:
    import gc

    fn = batched_fn(lambda b: b)
    registry = CollectorRegistry()
    register(fn, "gone", registry=registry)
    fn.close()
    del fn
    gc.collect()
    got = samples(registry)
    assert not any(name.startswith("gone_requests") for name, _ in got)


def test_default_registry_is_used_when_none_given() -> None:
    fn = batched_fn(lambda b: b)
    collector = register(fn, "batched_fn_default_registry_test")
    try:
        text = generate_latest(prometheus_client.REGISTRY).decode()
        assert "batched_fn_default_registry_test_requests_total" in text
    finally:
        prometheus_client.REGISTRY.unregister(collector)
        fn.close()


def test_importing_batched_fn_does_not_import_prometheus_client() -> None:
    import subprocess
    import sys

    code = ("import sys, batched_fn, batched_fn.prometheus; "
            "assert 'prometheus_client' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
