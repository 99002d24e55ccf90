"""Deadlines of ``submit(timeout=...)`` futures, fired by one shared thread.

A blocking caller times out on its own and an asyncio caller through its loop;
a Future has no thread of its own, so this thread withdraws expired requests
and fails their futures on time even while every worker is busy.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Callable

from ._batchcore import monotonic_ns

__all__ = ["DeadlineTimer"]


class DeadlineTimer:
    """A heap of (deadline, callback) run by one lazily started daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()   # guards _heap and _thread
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline_ns: int, callback: Callable[[], None]) -> None:
        """Run callback in the timer thread once monotonic_ns() >= deadline_ns."""
        with self._cond:
            heapq.heappush(self._heap, (deadline_ns, next(self._seq), callback))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="batched_fn-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][0] == deadline_ns:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > monotonic_ns():
                    timeout = None if not self._heap else (self._heap[0][0] - monotonic_ns()) / 1e9
                    self._cond.wait(timeout)
                _, _, callback = heapq.heappop(self._heap)
            callback()


def expire_future(expire: Callable[[object], bool], request: object, fut: Future) -> Callable[[], None]:
    """A timer callback: withdraw request and fail fut with TimeoutError if still queued."""

    def fire() -> None:
        if expire(request) and not fut.done():
            try:
                fut.set_exception(TimeoutError("request not taken into a batch before its timeout"))
            except Exception:   # cancelled by its owner in between
                pass

    return fire
