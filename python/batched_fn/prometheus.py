"""Prometheus metrics for a batched function (optional: ``pip install 'batched_fn[prometheus]'``).

``register(fn, "embed")`` adds one collector to a ``prometheus_client``
registry (thread safety: each histogram's lock guards its counts, which
worker threads fill while a scrape reads them; counters come from
``fn.stats()``, whose counts are the core's atomics).  Counters are read
from ``fn.stats()`` at scrape time; histograms are filled after each batch
through ``fn.add_batch_listener``.  With ``name="embed"`` the metrics are:

- ``embed_requests_total{outcome}``: completed, failed, timed_out, cancelled, rejected
- ``embed_batches_total{reason}``: full, delay, drain, deadline, close
- ``embed_priority_outcomes_total{priority, outcome}``: answered (in time), late, shed,
  expired, for every priority seen (README "Deadlines and priorities")
- ``embed_batch_size``: histogram of inputs per batch
- ``embed_queue_wait_seconds``: histogram of how long each batch's oldest request waited
- ``embed_handler_seconds``: histogram of the handler's time per batch
- ``embed_queued``, ``embed_running``, ``embed_healthy``: gauges

``prometheus_client`` is imported only when :func:`register` runs, so importing
this module never needs it.
"""

from __future__ import annotations

import bisect
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ._stats import BatchInfo

if TYPE_CHECKING:  # pragma: no cover
    from ._api import BatchedFn

__all__ = ["register", "BatchedFnCollector", "DEFAULT_TIME_BUCKETS"]

#: upper bounds (seconds) of the queue-wait and handler-time histograms
DEFAULT_TIME_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

_OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "rejected")
_PRIORITY_OUTCOMES = ("answered", "late", "shed", "expired")


def _import_prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # noqa: F401  (the metric families)
    except ImportError as exc:  # the extra is optional
        raise ImportError("batched_fn.prometheus needs prometheus_client: "
                          "pip install 'batched_fn[prometheus]'") from exc
    return prometheus_client


def _size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to max_batch_size, and max_batch_size itself."""
    bounds: list[float] = []
    b = 1
    while b < max_batch_size:
        bounds.append(float(b))
        b *= 2
    bounds.append(float(max_batch_size))
    return tuple(bounds)


class _Histogram:
    """Bucket counts kept by the batch listener (worker threads), read at scrape time."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)   # the last one is +Inf
        self.total = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)   # bucket "le" is inclusive
        with self.lock:
            self.counts[i] += 1
            self.total += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        with self.lock:
            counts, total = list(self.counts), self.total
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cumulative)))
        return buckets, total


class BatchedFnCollector:
    """A prometheus_client collector for one batched function; made by :func:`register`.

    Holds the function weakly: once it is garbage, the collector yields nothing.
    """

    def __init__(self, fn: "BatchedFn[Any, Any]", name: str,
                 time_buckets: Sequence[float] = DEFAULT_TIME_BUCKETS) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"invalid name value: expected a Prometheus metric name "
                             f"matching [a-zA-Z_:][a-zA-Z0-9_:]* (got {name!r})")
        self._pc = _import_prometheus()
        self.name = name
        self._fn = weakref.ref(fn)
        self.batch_size = _Histogram(_size_buckets(fn.config.max_batch_size))
        self.queue_wait = _Histogram(time_buckets)
        self.handler_time = _Histogram(time_buckets)

    def _on_batch(self, info: BatchInfo) -> None:
        """Batch listener: runs in the worker thread after each batch."""
        self.batch_size.observe(info.size)
        self.queue_wait.observe(info.oldest_wait)
        self.handler_time.observe(info.handler_seconds)

    def describe(self) -> list[Any]:
        """The metric families this collector yields (names only), for the registry's checks."""
        return list(self._families(None))

    def collect(self) -> Iterator[Any]:
        """Called by the registry at scrape time."""
        fn = self._fn()
        if fn is None:
            return iter(())
        return self._families(fn)

    def _families(self, fn: "BatchedFn[Any, Any] | None") -> Iterator[Any]:
        core = self._pc.core
        n = self.name
        requests = core.CounterMetricFamily(f"{n}_requests", "Requests by outcome (rejected: refused with Full).",
                                            labels=["outcome"])
        batches = core.CounterMetricFamily(f"{n}_batches", "Batches dispatched, by why they were dispatched.",
                                           labels=["reason"])
        by_priority = core.CounterMetricFamily(
            f"{n}_priority_outcomes", "Calls by priority: answered in time, late (timed out in a running batch), "
            "shed (refused by prediction), expired (timed out while queued).", labels=["priority", "outcome"])
        queued = core.GaugeMetricFamily(f"{n}_queued", "Requests waiting in the queue now.")
        running = core.GaugeMetricFamily(f"{n}_running", "Requests inside a handler now.")
        healthy = core.GaugeMetricFamily(f"{n}_healthy", "1 while every worker runs and calls are accepted.")
        if fn is not None:
            stats = fn.stats()
            for outcome in _OUTCOMES:
                requests.add_metric([outcome], getattr(stats, outcome))
            for reason, count in sorted(stats.batches_by_reason.items()):
                batches.add_metric([reason], count)
            for priority, counts in stats.by_priority.items():
                for outcome in _PRIORITY_OUTCOMES:
                    by_priority.add_metric([str(priority), outcome], getattr(counts, outcome))
            queued.add_metric([], stats.queued)
            running.add_metric([], stats.running)
            healthy.add_metric([], 1.0 if fn.healthy else 0.0)
        yield requests
        yield batches
        yield by_priority
        yield queued
        yield running
        yield healthy
        for hist, suffix, doc in (
                (self.batch_size, "batch_size", "Inputs per batch."),
                (self.queue_wait, "queue_wait_seconds", "Seconds the oldest request of each batch waited."),
                (self.handler_time, "handler_seconds", "Seconds the handler ran, per batch.")):
            if fn is None:
                yield core.HistogramMetricFamily(f"{n}_{suffix}", doc)
            else:
                buckets, total = hist.snapshot()
                yield core.HistogramMetricFamily(f"{n}_{suffix}", doc, buckets=buckets, sum_value=total)


def register(fn: "BatchedFn[Any, Any]", name: str, registry: Any = None,
             time_buckets: Sequence[float] = DEFAULT_TIME_BUCKETS) -> BatchedFnCollector:
    """Export fn's counters and histograms as Prometheus metrics prefixed with name.

    registry defaults to ``prometheus_client.REGISTRY``.  Call it before the
    first batch for complete histograms (counters are complete either way).
    Returns the collector; ``registry.unregister(collector)`` removes it.
    Raises ValueError for a name that is not a metric name or is already taken
    on the registry, ImportError without prometheus_client.
    """
    pc = _import_prometheus()
    collector = BatchedFnCollector(fn, name, time_buckets)
    (pc.REGISTRY if registry is None else registry).register(collector)
    fn.add_batch_listener(collector._on_batch)   # only once the name was accepted
    return collector
