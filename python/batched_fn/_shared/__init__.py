"""One BatchedFn, many processes: ``BatchedFn.share(name)`` and :func:`connect`.

The model process exports its BatchedFn under a name; other processes of the
same user connect to it by name and call it as if it were local.  Requests
of every process meet in the model process's one queue, so batches mix them.
"""

from ._client import RemoteError, RemoteFn, RemoteTraceback, connect
from ._names import check_name, runtime_dir
from ._owner import DEFAULT_MAX_ITEM_BYTES, Owner, share

__all__ = ["connect", "share", "RemoteFn", "RemoteError", "RemoteTraceback", "Owner",
           "DEFAULT_MAX_ITEM_BYTES", "check_name", "runtime_dir"]
