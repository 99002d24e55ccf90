"""One small adapter per batcher, so every scenario drives them the same way.

Each adapter is built fresh for one measurement (inside the event loop that
will drive it, for asyncio modes) and exposes:

* ``call(x)``  -- blocking call from a thread, or None if the peer has no such mode;
* ``acall(x)`` -- coroutine for asyncio callers, or None;
* ``close()``  -- stop it (``aclose()`` for asyncio-only peers).

The handler is always a plain ``handler(batch: list) -> list``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
from typing import Any, Callable

from naive import NaiveBatcher

PEERS = ["batched_fn", "naive", "batched", "ray_serve", "async_batcher"]

# What each peer is, for the table footnotes.
DESCRIPTIONS = {
    "batched_fn": "this project (Cython core, lock-free ring, worker thread)",
    "naive": "benchmarks/naive.py: threading.Condition + deque + Future; asyncio via wrap_future",
    "batched": "`batched` (PyPI): BatchProcessor, worker thread polling with time.sleep(timeout_ms)",
    "ray_serve": "`ray[serve]` (PyPI): @serve.batch on an async function, in-process, no deployment",
    "async_batcher": "`async-batcher` (PyPI): AsyncBatcher, sync process_batch run in the loop's executor",
}

DIST = {"batched_fn": "batched_fn", "batched": "batched", "ray_serve": "ray",
        "async_batcher": "async-batcher"}


def version(peer: str) -> str:
    """The installed version of a peer's distribution ('' for the naive batcher)."""
    dist = DIST.get(peer)
    if dist is None:
        return ""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        if peer == "batched_fn":
            try:
                import batched_fn
                return getattr(batched_fn, "__version__", "in-tree build")
            except ImportError:
                pass
        return "not installed"


def available(peer: str) -> str | None:
    """None if the peer can run here, else the reason it cannot."""
    try:
        if peer == "batched":
            import batched  # noqa: F401
        elif peer == "ray_serve":
            from ray import serve  # noqa: F401
        elif peer == "async_batcher":
            import async_batcher  # noqa: F401
        elif peer == "batched_fn":
            import batched_fn  # noqa: F401
    except Exception as exc:  # report any import failure as the reason
        return f"{type(exc).__name__}: {exc}"
    return None


class Adapter:
    """The common face of one batcher instance."""

    def __init__(self, call: Callable[[Any], Any] | None, acall: Callable[[Any], Any] | None,
                 close: Callable[[], Any]) -> None:
        self.call = call
        self.acall = acall
        self._close = close

    async def aclose(self) -> None:
        """Close from inside the loop (awaits peers whose close is a coroutine)."""
        res = self._close()
        if asyncio.iscoroutine(res):
            await res

    def close(self) -> None:
        """Close from a plain thread."""
        res = self._close()
        if asyncio.iscoroutine(res):
            res.close()


def has_threads(peer: str) -> bool:
    """Whether the peer can be called from plain threads."""
    return peer in ("batched_fn", "naive", "batched")


def make(peer: str, handler: Callable[[list], list], max_batch_size: int, max_delay: float,
         **extra: Any) -> Adapter:
    """A fresh instance of peer around handler (asyncio-only peers: call inside the loop)."""
    if peer == "batched_fn":
        from batched_fn import batched_fn
        bf = batched_fn(handler, max_batch_size=max_batch_size, max_delay=max_delay,
                        channel_cap=extra.pop("channel_cap", 8192), **extra)
        bf.start()
        return Adapter(bf.__call__, bf.acall, bf.close)
    if peer == "naive":
        nb = NaiveBatcher(handler, max_batch_size, max_delay)
        return Adapter(nb.__call__, nb.acall, nb.close)
    if peer == "batched":
        from batched import BatchProcessor
        bp = BatchProcessor(handler, batch_size=max_batch_size, timeout_ms=max_delay * 1000.0)
        bp.start()
        return Adapter(bp.__call__, bp.acall, bp.shutdown)
    if peer == "ray_serve":
        from ray import serve
        from ray.serve import batching
        # serve.batch asks the replica context for max_ongoing_requests only to log
        # a warning; outside a deployment there is none, so that check is skipped.
        batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_delay)
        async def ray_batch(items: list) -> list:
            return handler(items)

        return Adapter(None, ray_batch, lambda: None)
    if peer == "async_batcher":
        from async_batcher.batcher import AsyncBatcher

        class _Batcher(AsyncBatcher):
            def process_batch(self, batch: list) -> list:  # sync: run in the loop's executor
                return handler(batch)

        ab = _Batcher(max_batch_size=max_batch_size, max_queue_time=max_delay)
        return Adapter(None, ab.process, ab.stop)
    raise ValueError(f"unknown peer: expected one of {PEERS} (got {peer!r})")
