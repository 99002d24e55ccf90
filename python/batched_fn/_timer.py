"""Deadlines of ``submit(timeout=...)`` futures, fired by one shared thread.

A blocking caller times out on its own and an asyncio caller through its loop;
a Future has no thread of its own, so this thread withdraws expired requests
and fails their futures on time even while every worker is busy.

Entries refer to the request and the future weakly, so a finished request's
input and output are freed at once, not at its deadline; entries of finished
futures are swept out whenever the heap has doubled since the last sweep.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable

from ._batchcore import monotonic_ns

__all__ = ["DeadlineTimer"]

#: never sweep a heap smaller than this
_MIN_SWEEP = 1024
_TIMEOUT_MESSAGE = "request not taken into a batch before its timeout"


class DeadlineTimer:
    """A heap of (deadline, request, future) served by one lazily started daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()   # guards _heap, _thread, _sweep_at
        self._heap: list[tuple[int, int, Any, Any, Callable[[Any], bool]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._sweep_at = _MIN_SWEEP

    def add(self, deadline_ns: int, request: Any, fut: Future, expire: Callable[[Any], bool]) -> None:
        """At deadline_ns, if ``expire(request)`` withdraws it, fail fut with TimeoutError."""
        entry = (deadline_ns, next(self._seq), weakref.ref(request), weakref.ref(fut), expire)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if len(self._heap) >= self._sweep_at:
                self._sweep()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="batched_fn-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()

    def __len__(self) -> int:
        return len(self._heap)

    def _sweep(self) -> None:
        """Drop entries whose future is gone or done (lock held)."""
        self._heap = [e for e in self._heap if (f := e[3]()) is not None and not f.done()]
        heapq.heapify(self._heap)
        self._sweep_at = max(_MIN_SWEEP, 2 * len(self._heap))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > monotonic_ns():
                    timeout = None if not self._heap else (self._heap[0][0] - monotonic_ns()) / 1e9
                    self._cond.wait(timeout)
                _, _, request_ref, fut_ref, expire = heapq.heappop(self._heap)
            request, fut = request_ref(), fut_ref()
            if request is None or fut is None or fut.done():
                continue
            if expire(request) and not fut.done():
                try:
                    fut.set_exception(TimeoutError(_TIMEOUT_MESSAGE))
                except Exception:   # cancelled by its owner in between
                    pass
