"""What a batched function reports about itself: :class:`Stats` and :class:`BatchInfo`.

Thread safety: a :class:`Recorder` is written by every worker and read by any
thread calling ``stats()``; its ``_lock`` guards the windows of recent batches
and the set of logged callback errors (taken once per batch, never per call).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Stats", "BatchInfo", "KeyStats", "PriorityStats", "Recorder"]

log = logging.getLogger("batched_fn")

#: how many recent batches the percentiles of Stats cover
WINDOW = 1024


@dataclass(frozen=True)
class BatchInfo:
    """One dispatched batch, as given to ``on_batch`` in the worker thread after it ran.

    Attributes:
        size: inputs in the batch.
        cost: summed ``cost`` of its inputs (0 without ``cost=``).
        reason: why it was dispatched: ``full``, ``delay``, ``drain``, ``deadline`` or ``close``.
        oldest_wait: seconds its oldest request waited in the queue.
        handler_seconds: seconds the handler ran.
        worker: index of the worker that ran it.
        delay: seconds the batch could wait for more inputs: ``max_delay``, or
            with ``max_delay="auto"`` the wait the worker chose (0: dispatched at once).
    """

    size: int
    cost: float
    reason: str
    oldest_wait: float
    handler_seconds: float
    worker: int
    delay: float = 0.0


@dataclass(frozen=True)
class KeyStats:
    """The counters of one batch key (``batch_key=``), in :attr:`Stats.by_key`.

    Attributes:
        submitted: calls of this key accepted into the queue.
        batches: batches of this key dispatched.
        batched_items: requests those batches held.
        queued: requests of this key waiting now.
        mean_batch_size: batched_items / batches (0 before the first batch).
    """

    submitted: int
    batches: int
    batched_items: int
    queued: int
    mean_batch_size: float


@dataclass(frozen=True)
class PriorityStats:
    """What became of the calls of one priority (``Stats.by_priority``).

    Attributes:
        answered: got the handler's outcome (a result, or its exception) before their deadline.
        late: their deadline came while their batch ran (TimeoutError; the output was dropped).
        shed: refused at once with ``Full``: by the estimate they could not finish in time.
        expired: their deadline came while queued, or would have in any batch (TimeoutError).
    """

    answered: int = 0
    late: int = 0
    shed: int = 0
    expired: int = 0


@dataclass(frozen=True)
class Stats:
    """A snapshot of a batched function's counters.

    Every request accepted into the queue (``submitted``) ends as exactly one of
    ``completed``, ``failed``, ``timed_out`` or ``cancelled``, or is still
    ``queued`` or ``running``.  ``rejected`` counts calls refused with ``Full``
    (never queued; requests evicted from a full queue count as failed).
    ``timed_out`` is ``expired`` (while queued) plus ``late`` (inside a
    running batch); a late request no longer counts as running.
    """

    submitted: int
    completed: int
    failed: int
    rejected: int
    timed_out: int
    cancelled: int
    batches: int
    queued: int
    running: int
    mean_batch_size: float
    mean_fill: float
    batches_by_reason: Mapping[str, int] = field(default_factory=dict)
    queue_wait_p50: float = 0.0
    queue_wait_p99: float = 0.0
    handler_p50: float = 0.0
    handler_p99: float = 0.0
    #: mean of BatchInfo.delay over the recent batches (max_delay="auto": the waits it chose)
    mean_delay: float = 0.0
    #: of timed_out: failed at their deadline inside a running batch (the batch's output for them was dropped)
    late: int = 0
    #: of timed_out: failed while queued (their deadline passed, or by the handler estimate no batch could
    #: finish in time), never run
    expired: int = 0
    #: of rejected: refused at once with Full because by the estimate they would finish after their deadline
    shed: int = 0
    #: answered, late, shed and expired calls by priority (every priority seen so far)
    by_priority: Mapping[int, PriorityStats] = field(default_factory=dict)
    #: with batch_key: key -> KeyStats, for the (at most max_keys) keys used most recently
    by_key: Mapping[Any, KeyStats] = field(default_factory=dict)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index]


class Recorder:
    """Per-batch bookkeeping shared by the workers of one batched function.

    Holds no reference to the BatchedFn, so an unclosed one can be collected.
    """

    def __init__(self, on_batch: Callable[[BatchInfo], Any] | None) -> None:
        self.on_batch = on_batch
        self.listeners: list[Callable[[BatchInfo], Any]] = []   # exporters (prometheus)
        self.waits: deque[float] = deque(maxlen=WINDOW)
        self.handler_times: deque[float] = deque(maxlen=WINDOW)
        self.delays: deque[float] = deque(maxlen=WINDOW)
        self._logged: set[type] = set()        # callback error kinds already logged
        self._lock = threading.Lock()          # guards waits, handler_times, delays, _logged

    def batch_done(self, size: int, cost: float, reason: str, oldest_wait: float,
                   handler_seconds: float, worker: int, delay: float = 0.0) -> None:
        """Record one batch and run the callbacks, which never raise here."""
        with self._lock:
            self.waits.append(oldest_wait)
            self.handler_times.append(handler_seconds)
            self.delays.append(delay)
        if self.on_batch is None and not self.listeners:
            return      # the common case: no BatchInfo to build
        info = BatchInfo(size, cost, reason, oldest_wait, handler_seconds, worker, delay)
        if self.on_batch is not None:
            self._run(self.on_batch, info)
        for listener in self.listeners:
            self._run(listener, info)

    def _run(self, callback: Callable[[BatchInfo], Any], info: BatchInfo) -> None:
        try:
            callback(info)
        except BaseException as exc:  # a callback bug (even SystemExit) must not reach callers
            with self._lock:
                first = type(exc) not in self._logged
                self._logged.add(type(exc))
            if first:
                log.exception("on_batch callback raised %s (logged once per kind)", type(exc).__name__)

    def mean_delay(self) -> float:
        """Mean delay of the recent batches (seconds)."""
        with self._lock:
            delays = list(self.delays)
        return sum(delays) / len(delays) if delays else 0.0

    def percentiles(self) -> tuple[float, float, float, float]:
        with self._lock:
            waits, times = list(self.waits), list(self.handler_times)
        waits.sort()
        times.sort()
        return (_percentile(waits, 0.5), _percentile(waits, 0.99),
                _percentile(times, 0.5), _percentile(times, 0.99))
