"""The worker thread: build the context, then collect -> run the handler -> deliver.

Thread safety: a worker's own state is its thread's alone; the channel is the
core's (atomics and its consumer lock); with several workers, ``collect_lock``
lets one collect at a time while the others run their handlers in parallel;
``worker_ids`` is a set changed by single atomic operations.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Mapping as MappingABC
from typing import Any, Callable, Mapping

from ._batchcore import Channel, monotonic_ns, set_timer_slack, wrapped_error
from ._stats import Recorder
from .errors import BatchedFnError, InternalError

__all__ = ["Worker", "check_outputs", "handler_reference"]

log = logging.getLogger("batched_fn")


def check_outputs(outputs: Any, n: int) -> Any:
    """Return outputs as a list or tuple of n items, else raise BatchedFnError.

    Lists and tuples pass at once; other sized, indexable objects (a tensor,
    an array) pass too.  None, iterators, generators and mappings do not.
    """
    kind = type(outputs)
    if kind is not list and kind is not tuple:
        if outputs is None or isinstance(outputs, (MappingABC, str, bytes)) or not (
                hasattr(kind, "__len__") and hasattr(kind, "__getitem__")):
            raise BatchedFnError(
                f"handler must return a sequence of {n} outputs (got {kind.__name__})")
    try:
        m = len(outputs)
    except Exception as exc:
        raise BatchedFnError(f"handler output has no length ({kind.__name__})") from exc
    if m != n:
        raise BatchedFnError(f"handler returned {m} outputs for a batch of {n} inputs")
    if kind is not list and kind is not tuple:
        # Read every item now, inside the handler's error handling: a
        # sequence whose item access fails fails its batch, not the worker.
        try:
            outputs = [outputs[i] for i in range(n)]
        except Exception as exc:
            raise BatchedFnError(f"reading output items of {kind.__name__} failed: "
                                 f"{type(exc).__name__}") from exc
    return outputs


def _batch_error(exc: BaseException) -> BaseException:
    """The exception the callers of a failed batch get."""
    if isinstance(exc, Exception):
        return exc
    # KeyboardInterrupt, SystemExit, ... raised by a handler belong to the
    # handler, not to the callers' threads: hand them over wrapped.
    return wrapped_error(exc)


def handler_reference(handler: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A zero-argument callable that returns handler, or None once it is gone.

    A bound method is held weakly, so the worker thread does not keep the
    method's object (which often holds the batched function itself) alive;
    anything else is held as it is.
    """
    if inspect.ismethod(handler) and not inspect.isclass(handler.__self__):
        try:
            return weakref.WeakMethod(handler)
        except TypeError:      # its object takes no weak references
            pass
    return lambda: handler


class Worker(threading.Thread):
    """One worker: owns one context and runs the handler on batches from the channel."""

    def __init__(self, index: int, channel: Channel, handler: Callable[[], Callable[..., Any] | None],
                 context: Mapping[str, Callable[[], Any]], collect_lock: threading.Lock | None,
                 recorder: Recorder, worker_ids: set[int], name: str) -> None:
        super().__init__(name=f"{name}-worker-{index}", daemon=True)
        self.index = index
        self.channel = channel
        self.handler = handler      # see handler_reference
        self.context_factories: Mapping[str, Callable[[], Any]] | None = context
        self.collect_lock = collect_lock
        self.recorder = recorder
        self.worker_ids = worker_ids
        self.ready = threading.Event()
        self.error: BaseException | None = None   # the context failure, if any

    def run(self) -> None:
        set_timer_slack(1)   # timed waits wake within ~20 us instead of ~70 us
        ident = threading.get_ident()
        self.worker_ids.add(ident)
        try:
            factories, self.context_factories = self.context_factories or {}, None   # may be bound methods too
            try:
                context = {name: factory() for name, factory in factories.items()}
            except BaseException as exc:
                self.error = exc
                self.ready.set()
                self.channel.break_(exc)
                return
            del factories
            self.ready.set()
            try:
                self._loop(context)
            except BaseException as exc:
                # A bug outside the handler's own error handling: this worker is
                # gone, so fail what is queued rather than let callers wait forever.
                log.exception("batched_fn: worker %d died", self.index)
                self.error = exc
                self.channel.break_(exc)
                raise
        finally:
            self.worker_ids.discard(ident)

    def _loop(self, context: dict[str, Any]) -> None:
        channel, handler_ref, recorder, lock = self.channel, self.handler, self.recorder, self.collect_lock
        while True:
            if lock is None:
                got = channel.collect()
            else:
                with lock:
                    got = channel.collect()
            if got is None:
                return
            batch, reason, cost, delay = got
            n = len(batch)
            handler = handler_ref()
            if channel.close_cause is not None or handler is None:
                # a worker broke, or the handler's object was collected: nothing more runs
                channel.deliver(batch, None, channel.closed_error())
                del batch, got, handler
                continue
            inputs = [request.value for request in batch]
            start = monotonic_ns()
            try:
                try:
                    outputs = handler(inputs, **context)
                    if type(outputs) is not list or len(outputs) != n:
                        outputs = check_outputs(outputs, n)
                except BaseException as exc:
                    channel.deliver(batch, None, _batch_error(exc))
                else:
                    channel.deliver(batch, outputs, None)
            except BaseException as exc:   # a fault in delivery itself: nobody waits forever
                log.exception("batched_fn: delivering a batch failed")
                channel.fail_unfinished(batch, InternalError(f"delivering the batch failed: {type(exc).__name__}"))
            elapsed = monotonic_ns() - start
            channel.record_handler_time(n, elapsed)
            recorder.batch_done(n, cost, reason, (start - batch[0].arrival_ns) * 1e-9, elapsed * 1e-9, self.index,
                               delay)
            # nothing of this batch (nor the handler's object) stays referenced while we wait for the next
            del batch, inputs, got, handler
            outputs = None

