"""batched_fn: dynamic batching in front of a model.

Calls arrive one at a time from threads or asyncio tasks; the handler runs on
batches of at most ``max_batch_size`` inputs, waiting at most ``max_delay``
after a batch's first input.  See :func:`batched_fn`.
"""

from ._api import BatchedFn, batched_fn
from ._shared import connect
from ._stats import BatchInfo, PriorityStats, Stats
from .errors import BatchedFnError, Closed, Failed, Full, InternalError

__all__ = [
    "batched_fn", "BatchedFn", "connect", "Failed", "BatchInfo", "Stats", "PriorityStats",
    "BatchedFnError", "Full", "Closed", "InternalError",
]
__version__ = "0.1.0"
