# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The exceptions of batched_fn and the text of every message the core raises.

They are defined here, in the lowest floor, because the core raises them;
``batched_fn.errors`` re-exports them (as ``queue.Empty`` comes from
``_queue``).  Each message has one builder below, so its text has one source.

Shared state: none (a Failed is immutable once built).
"""

import copy as _copy

#: a request whose deadline passed before a batch took it
TIMEOUT_MESSAGE = "request not taken into a batch before its timeout"
#: a request whose deadline passed while its batch ran (its output is dropped)
LATE_MESSAGE = "request's batch did not finish before its timeout"
#: a request not put into a batch that the handler estimate says would end after its deadline
PREDICTED_MESSAGE = "request not taken into a batch: by the handler estimate it could not finish before its timeout"
#: the start of the Full error of a call shed by prediction
SHED_MESSAGE = "request shed: by the handler estimate it would finish after its deadline"
#: on_full="block": no room came before the call's deadline
NO_ROOM_MESSAGE = "no room in the queue before the timeout (on_full='block')"


class BatchedFnError(Exception):
    """Base class of every error raised by batched_fn itself."""


class Full(BatchedFnError):
    """Raised by a call when the queue holds ``channel_cap`` requests, or when by the
    handler estimate the call could not finish before its timeout (shed); nothing was queued.

    A web server maps it to HTTP 503 with a ``Retry-After`` header.

    Attributes:
        queued: how many requests were waiting when this one was refused
            (shed: how many were ahead of it).
        retry_after: an estimate, in seconds (never negative), of when a retry
            may find room (shed: may finish in time), from the recent rate at
            which batches drain the queue.
    """

    def __init__(self, message: str, queued: int = 0, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.queued = queued
        self.retry_after = max(0.0, retry_after)

    def __reduce__(self):  # keep the attributes through pickling
        return (type(self), (self.args[0] if self.args else "", self.queued, self.retry_after))


class Closed(BatchedFnError):
    """Raised by a call after ``close()``, or when a worker's context factory failed.

    When a worker failed, ``__cause__`` is the original exception.
    """


class InternalError(BatchedFnError):
    """An internal invariant was broken: a bug in batched_fn, please report it."""


cdef class Failed:
    """Put ``Failed(exc)`` at slot *i* of a handler's output to fail only caller *i*.

    That caller gets ``exc`` raised (the same object, its traceback kept); every
    other caller of the batch gets its own result.  Subclasses count as Failed.

    Raises:
        TypeError: ``exc`` is not an exception instance.
    """

    def __init__(self, error):
        if not isinstance(error, BaseException):
            raise TypeError(f"Failed() expects an exception instance (got {error!r})")
        self.error = error

    def __repr__(self):
        return f"{type(self).__name__}({self.error!r})"


cpdef object timeout_error():
    return TimeoutError(TIMEOUT_MESSAGE)


cpdef object late_error():
    return TimeoutError(LATE_MESSAGE)


cpdef object predicted_error():
    return TimeoutError(PREDICTED_MESSAGE)


cpdef object no_room_error():
    return TimeoutError(NO_ROOM_MESSAGE)


cpdef object full_error(size_t queued, size_t cap, double retry_after):
    return Full(f"queue full: {queued} requests waiting (channel_cap={cap})", queued, retry_after)


cpdef object evicted_error(size_t queued, double retry_after):
    return Full("request evicted from a full queue by a newer one (on_full='drop_oldest')",
                queued, retry_after)


cpdef object shed_error(size_t ahead, double retry_after):
    return Full(f"{SHED_MESSAGE} ({ahead} requests ahead of it; retry after {retry_after:.3f}s)",
                ahead, retry_after)


cpdef object closed_error(object cause):
    """The Closed error of a closed function; cause: the worker failure, or None."""
    if cause is None:
        return Closed("the batched function is closed")
    err = Closed(f"the batched function is closed: its worker failed: {describe(cause)}")
    err.__cause__ = cause
    return err


def describe(exc) -> str:
    """``Type: message`` of an exception whose ``__str__`` may itself raise."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except BaseException:
        return f"{type(exc).__name__} (unprintable)"


cpdef object wrapped_error(object exc):
    """The error a caller gets for an exception it cannot be given as is.

    KeyboardInterrupt and SystemExit raised by a handler belong to the
    handler's thread, and asyncio refuses StopIteration as a future's
    exception: the caller gets a BatchedFnError caused by exc instead.
    """
    err = BatchedFnError(f"handler raised {type(exc).__name__}")
    err.__cause__ = exc
    return err


cdef object caller_copy(object exc):
    """A copy of exc for one more caller of a failed batch, so that raising it
    in several threads never mixes their tracebacks and contexts; exc itself
    when it cannot be copied."""
    try:
        dup = _copy.copy(exc)
    except BaseException:
        return exc
    if type(dup) is not type(exc):
        return exc
    dup.__cause__ = exc.__cause__
    dup.__suppress_context__ = exc.__suppress_context__
    dup.__traceback__ = exc.__traceback__
    return dup

