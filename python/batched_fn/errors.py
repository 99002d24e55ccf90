"""The exceptions of batched_fn.

Every library error subclasses :class:`BatchedFnError`.  Timeouts raise the
builtin :class:`TimeoutError`; an exception raised by your handler reaches the
callers of its batch with its own type and message.  The classes are defined
by the compiled core, which raises them, and re-exported here.
"""

from __future__ import annotations

from ._batchcore import BatchedFnError, Closed, Failed, Full, InternalError

__all__ = ["BatchedFnError", "Full", "Closed", "InternalError", "Failed"]
