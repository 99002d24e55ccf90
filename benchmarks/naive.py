"""The naive pure-Python batcher the benchmarks compare batched_fn against.

It is the batcher one writes in an afternoon: callers append to a deque under
a threading.Condition and get a concurrent.futures.Future; one worker thread
waits for the first item, then up to max_delay for more, runs the handler and
sets each future.  asyncio callers await the same future via asyncio.wrap_future.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence


class NaiveBatcher:
    """Threads + Condition + deque + Future: the baseline dynamic batcher."""

    def __init__(self, handler: Callable[[list], Sequence[Any]], max_batch_size: int = 32,
                 max_delay: float = 0.001) -> None:
        self._handler = handler
        self._max = max_batch_size
        self._delay = max_delay
        self._cond = threading.Condition()
        self._queue: deque[tuple[Any, Future]] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="naive-batcher", daemon=True)
        self._thread.start()

    def submit(self, value: Any) -> Future:
        """Queue value; the returned future gets its output."""
        fut: Future = Future()
        with self._cond:
            self._queue.append((value, fut))
            self._cond.notify()
        return fut

    def __call__(self, value: Any) -> Any:
        """Blocking call from a thread."""
        return self.submit(value).result()

    async def acall(self, value: Any) -> Any:
        """asyncio call: the thread future wrapped for the running loop."""
        return await asyncio.wrap_future(self.submit(value))

    def close(self) -> None:
        """Finish what is queued and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        cond, queue = self._cond, self._queue
        while True:
            with cond:
                while not queue and not self._closed:
                    cond.wait()
                if not queue:
                    return
                # The delay counts from when the worker saw the first item.
                deadline = time.monotonic() + self._delay
                while len(queue) < self._max and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                n = min(len(queue), self._max)
                batch = [queue.popleft() for _ in range(n)]
            try:
                outputs = self._handler([v for v, _ in batch])
            except BaseException as exc:  # every caller of the batch gets the error
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), out in zip(batch, outputs):
                fut.set_result(out)
