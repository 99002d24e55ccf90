"""The exceptions of batched_fn.

Every library error subclasses :class:`BatchedFnError`.  Timeouts raise the
builtin :class:`TimeoutError`; an exception raised by your handler reaches the
callers of its batch with its own type and message.  The classes are defined
by the compiled core, which raises them, and re-exported here.

:class:`RemoteError` (a handler's exception that could not be rebuilt in the
calling process) and :class:`RemoteTraceback` (the ``__cause__`` carrying a
handler's traceback from the model process) belong to cross-process calls
(``batched_fn.connect``); they are imported from there on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._batchcore import BatchedFnError, Closed, Failed, Full, InternalError

if TYPE_CHECKING:
    from ._shared import RemoteError, RemoteTraceback

__all__ = ["BatchedFnError", "Full", "Closed", "InternalError", "Failed", "RemoteError", "RemoteTraceback"]

_SHARED_NAMES = ("RemoteError", "RemoteTraceback")


def __getattr__(name: str) -> Any:
    if name in _SHARED_NAMES:
        from . import _shared
        value = getattr(_shared, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batched_fn.errors' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SHARED_NAMES))
