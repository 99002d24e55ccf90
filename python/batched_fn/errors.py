"""The exceptions of batched_fn, defined once.

Every library error subclasses :class:`BatchedFnError`.  Timeouts raise the
builtin :class:`TimeoutError`; an exception raised by your handler reaches the
callers of its batch as it is.
"""

from __future__ import annotations

__all__ = ["BatchedFnError", "Full", "Closed", "InternalError"]


class BatchedFnError(Exception):
    """Base class of every error raised by batched_fn itself."""


class Full(BatchedFnError):
    """Raised by a call when the queue holds ``channel_cap`` requests; nothing was queued.

    A web server maps it to HTTP 503 with a ``Retry-After`` header.

    Attributes:
        queued: how many requests were waiting when this one was refused.
        retry_after: an estimate, in seconds (never negative), of when a retry
            may find room, from the recent rate at which batches drain the queue.
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
