"""The public face: :func:`batched_fn` and :class:`BatchedFn`."""

from __future__ import annotations

import asyncio
import atexit
import math
import os
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar, overload

from ._batchcore import Channel, mailbox_for
from ._config import ON_FULL_POLICIES, Config, check_timeout
from ._stats import BatchInfo, Recorder, Stats
from ._timer import DeadlineTimer
from ._worker import Worker
from .errors import Closed, Full

__all__ = ["BatchedFn", "batched_fn"]

In = TypeVar("In")
Out = TypeVar("Out")

#: every BatchedFn alive, so interpreter exit and fork can reach them
_LIVE: "weakref.WeakSet[BatchedFn[Any, Any]]" = weakref.WeakSet()
_DEADLINES = DeadlineTimer()
#: on_full="block" from asyncio polls for room at most this often (seconds)
_ASYNC_BLOCK_POLL = 0.002
#: close batches early so queued requests meet their deadlines (tests switch it off)
_DEADLINE_AWARE = True


class BatchedFn(Generic[In, Out]):
    """A function of one input that runs its handler on batches of inputs.

    Call it from any thread (``f(x)``), from asyncio (``await f.acall(x)``) or
    get a Future (``f.submit(x)``).  Workers start on the first call, or at
    :meth:`start`.  Build one with :func:`batched_fn`.
    """

    def __init__(self, handler: Callable[..., Sequence[Out]], config: Config) -> None:
        if not callable(handler):
            raise TypeError(f"invalid handler value: expected a callable (got {handler!r})")
        self.handler = handler
        self.config = config
        self.__name__ = getattr(handler, "__name__", "batched_fn")
        self.__doc__ = getattr(handler, "__doc__", None)
        self._policy = ON_FULL_POLICIES[config.on_full]
        self._cost = config.cost
        self._max_cost = config.max_batch_cost
        self._new_channel()
        _LIVE.add(self)

    def _new_channel(self) -> None:
        c = self.config
        self._chan = Channel(c.channel_cap or 0, c.max_batch_size, c.max_delay, c.max_batch_cost or 0.0,
                             _DEADLINE_AWARE)
        self._recorder = Recorder(c.on_batch)
        self._lock = threading.Lock()      # guards _workers, _started, _closed
        self._collect_lock = threading.Lock() if c.num_workers > 1 else None
        self._workers: list[Worker] = []
        self._started = False
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "BatchedFn[In, Out]":
        """Start the workers now and build their contexts (warm-up); return self.

        Waits until every context is built.  Raises Closed (with the factory's
        exception as ``__cause__``) if one failed, or if already closed.
        """
        self._ensure_started()
        for worker in self._workers:
            worker.ready.wait()
        for worker in self._workers:
            if worker.error is not None:
                raise Closed(f"context factory of worker {worker.index} failed: "
                             f"{type(worker.error).__name__}") from worker.error
        return self

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise self._chan.closed_error()
            if self._started:
                return
            chan, recorder = self._chan, self._recorder
            on_broken = _breaker(chan)
            self._workers = [
                Worker(i, chan, self.handler, self.config.context, self._collect_lock, recorder,
                       on_broken, self.__name__)
                for i in range(self.config.num_workers)
            ]
            for worker in self._workers:
                worker.start()
            self._started = True

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting calls, finish what is queued, and join the workers.

        Idempotent; safe from any thread, from inside the handler (which is not
        joined) and concurrently with :meth:`start`.  timeout bounds the join.
        """
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        self._chan.close()
        current = threading.current_thread()
        for worker in workers:
            if worker is not current:
                worker.join(timeout)
        owner = getattr(self, "_share_owner", None)
        if owner is not None:   # withdraw the name: connected callers get Closed
            owner.withdraw()

    def share(self, name: str, *, max_item_bytes: int = 4 << 20) -> "BatchedFn[In, Out]":
        """Export this function under name to other processes of this user; return self.

        Others call it through ``batched_fn.connect(name)``; see README "Several
        processes".  Raises ValueError if name is invalid or shared by a live process.
        """
        from ._shared import share
        self._share_owner = share(self, name, max_item_bytes=max_item_bytes)
        return self

    def __enter__(self) -> "BatchedFn[In, Out]":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        chan = getattr(self, "_chan", None)
        if chan is not None:
            chan.close()   # workers drain what is queued and exit

    @property
    def healthy(self) -> bool:
        """True while every worker runs and calls are accepted."""
        if self._closed or self._chan.is_closed:
            return False
        return all(w.is_alive() and w.error is None for w in self._workers)

    # ------------------------------------------------------------ calls

    def _cost_of(self, value: object) -> float:
        cost = self._cost(value)  # type: ignore[misc]
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
            raise ValueError(f"invalid cost value: expected a finite number >= 0 (got {cost!r})")
        if cost > self._max_cost:  # type: ignore[operator]
            raise ValueError(f"input cost {cost!r} exceeds max_batch_cost {self._max_cost!r}")
        return float(cost)

    def __call__(self, value: In, *, timeout: float | None = None) -> Out:
        """Run value through the handler in a batch; block until its output.

        The GIL is released while waiting.  Raises Full (queue at channel_cap),
        Closed, TimeoutError (not taken into a batch within timeout seconds),
        or the handler's exception.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        return self._chan.call(value, timeout, cost, self._policy)

    async def acall(self, value: In, *, timeout: float | None = None) -> Out:
        """``await`` the output for value; never blocks the event loop.

        Cancelling the task withdraws a request not yet in a batch (and
        discards the result of one already in a batch).  Raises like ``__call__``.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        if self._policy == 1:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            started = loop.time()
            request = await self._submit_async_blocking(value, fut, loop, timeout, cost)
            if timeout is not None:   # one deadline for waiting for room and for a batch
                timeout = max(0.0, timeout - (loop.time() - started))
        else:
            request, fut = self._chan.submit_here(value, timeout, cost, self._policy)
        if timeout is None:
            try:
                return await fut
            except asyncio.CancelledError:
                self._chan.cancel(request)
                raise
        loop = fut.get_loop()
        handle = loop.call_at(loop.time() + timeout, _expire_async, self._chan, request, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            self._chan.cancel(request)
            raise
        finally:
            handle.cancel()

    async def _submit_async_blocking(self, value: Any, fut: Any, loop: Any, timeout: float | None,
                                     cost: float) -> Any:
        """on_full='block' for acall: wait for room by polling, never blocking the loop."""
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                # a failed poll is not a refusal: it does not count as rejected
                return self._chan.submit_async(value, fut, mailbox_for(loop), remaining, cost, 0, False)
            except Full:
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError("no room in the queue before the timeout (on_full='block')") from None
                await asyncio.sleep(_ASYNC_BLOCK_POLL)

    def submit(self, value: In, *, timeout: float | None = None) -> "Future[Out]":
        """Queue value and return a :class:`concurrent.futures.Future` of its output.

        Cancelling the future withdraws a request not yet in a batch.  With
        timeout, the future fails with TimeoutError if no batch took it in time.
        Full and Closed are raised here, at once.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        fut: Future[Out] = Future()
        request = self._chan.submit_future(value, fut, timeout, cost, self._policy)
        fut.add_done_callback(_cancel_on_cancelled(self._chan, request))
        if timeout is not None:
            _DEADLINES.add(request.deadline_ns, request, fut, self._chan.expire)
        return fut

    # ------------------------------------------------------------ stats

    def stats(self) -> Stats:
        """A snapshot of the counters; see :class:`Stats`."""
        c = self._chan
        batches = c.batches
        mean = c.batched_items / batches if batches else 0.0
        w50, w99, h50, h99 = self._recorder.percentiles()
        return Stats(
            submitted=c.submitted, completed=c.completed, failed=c.failed, rejected=c.rejected,
            timed_out=c.timed_out, cancelled=c.cancelled, batches=batches, queued=c.queued,
            running=self._recorder.running, mean_batch_size=mean,
            mean_fill=mean / self.config.max_batch_size, batches_by_reason=c.reason_counts(),
            queue_wait_p50=w50, queue_wait_p99=w99, handler_p50=h50, handler_p99=h99)

    def add_batch_listener(self, listener: Callable[[BatchInfo], Any]) -> None:
        """Also call listener(BatchInfo) after each batch, like ``on_batch`` (for exporters)."""
        self._recorder.listeners.append(listener)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<BatchedFn {self.__name__} {state} max_batch_size={self.config.max_batch_size}>"


def _breaker(chan: Channel) -> Callable[[BaseException], None]:
    """What a worker calls when its context failed: no caller may wait forever."""

    def broken(exc: BaseException) -> None:
        chan.close(exc)
        chan.fail_queued(chan.closed_error())   # carries exc as __cause__

    return broken


def _expire_async(chan: Channel, request: Any, fut: "asyncio.Future[Any]") -> None:
    if chan.expire(request) and not fut.done():
        fut.set_exception(TimeoutError("request not taken into a batch before its timeout"))


def _cancel_on_cancelled(chan: Channel, request: Any) -> Callable[["Future[Any]"], None]:
    def on_done(fut: "Future[Any]") -> None:
        if fut.cancelled():
            chan.cancel(request)

    return on_done


@overload
def batched_fn(
    handler: Callable[..., Sequence[Out]], /, *, max_batch_size: int = ..., max_delay: float = ...,
    channel_cap: int | None = ..., num_workers: int = ..., context: Mapping[str, Callable[[], Any]] | None = ...,
    on_full: str = ..., cost: Callable[[Any], float] | None = ..., max_batch_cost: float | None = ...,
    on_batch: Callable[[BatchInfo], Any] | None = ...,
) -> BatchedFn[Any, Out]: ...
@overload
def batched_fn(
    handler: None = None, /, *, max_batch_size: int = ..., max_delay: float = ...,
    channel_cap: int | None = ..., num_workers: int = ..., context: Mapping[str, Callable[[], Any]] | None = ...,
    on_full: str = ..., cost: Callable[[Any], float] | None = ..., max_batch_cost: float | None = ...,
    on_batch: Callable[[BatchInfo], Any] | None = ...,
) -> Callable[[Callable[..., Sequence[Out]]], BatchedFn[Any, Out]]: ...


def batched_fn(
    handler: Callable[..., Sequence[Any]] | None = None,
    /,
    *,
    max_batch_size: int = 32,
    max_delay: float = 0.005,
    channel_cap: int | None = None,
    num_workers: int = 1,
    context: Mapping[str, Callable[[], Any]] | None = None,
    on_full: str = "reject",
    cost: Callable[[Any], float] | None = None,
    max_batch_cost: float | None = None,
    on_batch: Callable[[BatchInfo], Any] | None = None,
) -> Any:
    """Make ``handler(batch: list, **context) -> sequence`` callable one input at a time.

    Use as ``batched_fn(handler, **knobs)`` or ``@batched_fn(**knobs)``.

    Args:
        max_batch_size: most inputs in one batch (int >= 1).
        max_delay: seconds a batch waits for more inputs after its first input
            arrived (>= 0; 0 takes what is queued without waiting).
        channel_cap: most requests queued and not yet in a batch; a call beyond
            it raises Full.  None: no cap of yours (the ring holds 2**20).
        num_workers: worker threads, each with its own context.
        context: name -> factory; each worker calls every factory once, in its
            own thread, and passes the objects to the handler by name.
        on_full: "reject" (Full at once), "block" (wait for room, up to the
            call's timeout) or "drop_oldest" (evict the oldest queued request).
        cost, max_batch_cost: a per-input cost function and a bound on the
            summed cost of a batch (both or neither).
        on_batch: called in the worker with a BatchInfo after each batch.

    Raises:
        TypeError, ValueError: a knob is invalid; the message names it.
    """
    config = Config.build(
        max_batch_size=max_batch_size, max_delay=max_delay, channel_cap=channel_cap,
        num_workers=num_workers, context=context, on_full=on_full, cost=cost,
        max_batch_cost=max_batch_cost, on_batch=on_batch)
    if handler is None:
        return lambda fn: BatchedFn(fn, config)
    return BatchedFn(handler, config)


# Interpreter exit: refuse new calls and let workers finish what is queued,
# without waiting long for a handler that may never return.
_EXIT_JOIN_SECONDS = 2.0


@atexit.register
def _close_all_at_exit() -> None:
    for bf in list(_LIVE):
        bf.close(timeout=_EXIT_JOIN_SECONDS)


def _after_fork_in_child() -> None:
    # The workers did not survive the fork and their locks may be held by
    # threads that no longer exist: start afresh; workers restart on the next
    # call.  Requests queued by the parent's threads belong to the parent.
    for bf in list(_LIVE):
        closed = bf._closed
        bf._new_channel()
        if closed:
            bf._closed = True
            bf._chan.close()
    global _DEADLINES
    _DEADLINES = DeadlineTimer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
