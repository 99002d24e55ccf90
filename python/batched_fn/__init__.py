"""batched_fn: dynamic batching in front of a model.

Calls arrive one at a time from threads or asyncio tasks; the handler runs on
batches of at most ``max_batch_size`` inputs, waiting at most ``max_delay``
after a batch's first input.  See :func:`batched_fn`.

What each name comes from: :func:`batched_fn` and :class:`BatchedFn` from
``_api`` (the Python layer over the compiled core, ``_batchcore``);
:class:`Stats` and :class:`BatchInfo` from ``_stats``; the exceptions from
:mod:`batched_fn.errors`.  :func:`connect` and :class:`RemoteFn` (one
batched function shared by several processes, ``_shared``) are imported on
first use, so ``import batched_fn`` loads none of the cross-process code (its
sockets, its fork hooks) until a process calls for it.
The torch layer is :mod:`batched_fn.torch` (imports torch when used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._api import BatchedFn, batched_fn
from ._buckets import LengthBuckets, length_buckets
from ._stats import BatchInfo, KeyStats, PriorityStats, Stats
from .errors import BatchedFnError, Closed, Failed, Full, InternalError

if TYPE_CHECKING:
    from ._shared import RemoteFn, connect

__all__ = [
    "batched_fn", "BatchedFn", "connect", "RemoteFn", "length_buckets", "LengthBuckets", "Failed", "BatchInfo",
    "Stats", "KeyStats", "PriorityStats",
    "BatchedFnError", "Full", "Closed", "InternalError",
]
__version__ = "0.1.0"

# Loaded by the first access (the module __getattr__ below): cross-process use only.
_SHARED_NAMES = ("connect", "RemoteFn")


def __getattr__(name: str) -> Any:
    if name in _SHARED_NAMES:
        from . import _shared
        value = getattr(_shared, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batched_fn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SHARED_NAMES))
