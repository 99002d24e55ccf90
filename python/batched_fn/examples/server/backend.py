"""Where a server process sends /embed and reads /stats, /metrics and health: the model, here or shared.

:class:`LocalBackend` holds the batcher in this process.  :class:`SharedBackend`
reaches the batcher of the model process (``--workers N``) through
``connect``, reconnecting for new calls when that process was restarted, and
bounds every wait on it.  Both ends of the control channel (the small shared
function that answers /stats, /healthz and /metrics for every worker) live
here: :func:`serve_model` in the model process, :class:`SharedBackend` in each
HTTP worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import sys
import time
from typing import Any, Callable, Coroutine, Protocol, TypeVar, cast

from batched_fn import BatchedFn, Closed, Failed, batched_fn

from .. import models
from .timing import GcPauses, Timings
from .config import ServerConfig

__all__ = ["Backend", "LocalBackend", "SharedBackend", "build_batcher", "serve_model", "control_name",
           "freeze_heap", "UnknownQuestion", "QUESTIONS", "CONTROL_SECONDS", "CLOSE_JOIN_SECONDS",
           "MODEL_LOAD_SECONDS"]

log = logging.getLogger("batched_fn.examples.server")

#: seconds the shutdown waits for a worker still running a batch (it is a daemon thread)
CLOSE_JOIN_SECONDS = 2.0
#: --workers > 1: seconds an HTTP worker waits at start for the model process to share its batcher
MODEL_LOAD_SECONDS = 600.0
#: --workers > 1: the longest /stats, /metrics or /healthz waits for the model process (then 503)
CONTROL_SECONDS = 2.0
#: --workers > 1: seconds a call may take to reach a restarted model process again
RECONNECT_SECONDS = 1.0
#: --workers > 1: after a failed reconnect, calls fail at once (503) for this many seconds
RECONNECT_PAUSE = 0.5
#: --workers > 1: a call's answer is awaited this long past its timeout before the worker gives up
#: itself (504): the model process answers TimeoutError first unless it is stuck
TIMEOUT_GUARD = 0.25

#: what the control channel answers
QUESTIONS = ("stats", "healthy", "metrics")

T = TypeVar("T")


def control_name(name: str) -> str:
    """The name the control channel is shared under, beside the model shared as name."""
    return name + "-control"


class UnknownQuestion(ValueError):
    """A control-channel question the model process does not know."""


# ---------------------------------------------------------------- the model


def build_batcher(config: ServerConfig, timed: bool = False) -> BatchedFn[str, Any]:
    """The batched embedding function; each worker thread loads its own model.

    With ``config.length_buckets`` inputs are keyed by length bucket
    (``models.length_key``): only texts of similar length share a batch.
    With timed, each output is ``(vector, started, finished)``: the
    ``time.perf_counter()`` readings around its batch's handler, which the
    backends turn into :class:`Timings` and strip before answering.
    """
    if config.model == "toy":
        options = {"dim": config.toy_dim, "batch_ms": config.toy_batch_ms, "item_ms": config.toy_item_ms}
    else:
        options = {"threads": config.torch_threads}

    def load_model() -> models.Embedder:
        return models.load(config.model, **options)

    if timed:
        clock = time.perf_counter

        def embed(texts: list[str], model: models.Embedder) -> list[Any]:
            started = clock()
            vectors = model.embed(texts)
            finished = clock()
            # a Failed(exc) slot fails only that text's caller
            return [v if v.__class__ is Failed else (v, started, finished) for v in vectors]
    else:
        def embed(texts: list[str], model: models.Embedder) -> list[Any]:
            return model.embed(texts)

    # --length-buckets: with --workers N the key is computed where the batcher lives (the model process)
    key = models.length_key(config.model) if config.length_buckets else None
    return batched_fn(embed, max_batch_size=config.max_batch_size, max_delay=cast(Any, config.max_delay),
                      channel_cap=config.channel_cap, num_workers=config.model_threads,
                      context={"model": load_model}, batch_key=key)


def freeze_heap(config: ServerConfig) -> None:
    """Move everything alive now (imports, the model) out of the garbage collector's passes.

    A full collection walks every tracked object; after start-up that is the
    import-time heap (FastAPI, numpy, torch, the model), milliseconds per pass,
    paid by whichever request triggered it.  ``gc.freeze()`` after load and
    warm-up leaves the collector only what requests create.  ``--gc-threshold``
    spaces the young passes further apart (each costs about the same, since
    what a request allocates is freed by reference counting, not by the passes).
    """
    if config.gc_freeze:
        gc.collect()
        gc.freeze()
    if config.gc_threshold:
        gc.set_threshold(config.gc_threshold, *gc.get_threshold()[1:])
    sys.setswitchinterval(config.switch_interval)


def stats_dict(fn: BatchedFn[Any, Any]) -> dict[str, Any]:
    """fn's Stats as a JSON-ready dict."""
    data = dataclasses.asdict(fn.stats())
    data["batches_by_reason"] = dict(data["batches_by_reason"])
    return data


def metrics_registry(fn: BatchedFn[Any, Any]) -> Any:
    """A Prometheus registry exporting fn (prefix ``embed_``), or None without prometheus_client."""
    try:
        from prometheus_client import CollectorRegistry

        from batched_fn.prometheus import register
    except ImportError:  # the [prometheus] extra is optional
        return None
    registry = CollectorRegistry()
    register(fn, "embed", registry=registry)
    return registry


def exposition(registry: Any) -> bytes:
    """The registry's metrics in Prometheus' text format."""
    from prometheus_client import generate_latest

    return cast(bytes, generate_latest(registry))


# ---------------------------------------------------------------- backends


class Backend(Protocol):
    """What the app needs from where the model is."""

    timings: Timings
    batcher: Any

    async def start(self) -> None:
        """Load or reach the model, warm it up; the app serves after this."""

    async def close(self) -> None:
        """Release the model or the connection (every request has its answer by now)."""

    async def acall(self, value: str, *, timeout: float | None = None, **options: Any) -> Any:
        """The embedding of value; raises like ``BatchedFn.acall``."""

    def explain_closed(self, exc: Closed) -> tuple[str, int] | None:
        """The 503 message and Retry-After seconds for a call that got Closed; None when the server is stopping."""

    async def stats(self) -> dict[str, Any]:
        """The batcher's counters as a dict (raises when they cannot be had in time)."""

    async def healthy(self) -> bool:
        """Whether calls are being answered."""

    async def metrics(self) -> bytes | None:
        """Prometheus text, or None without prometheus_client."""


class LocalBackend:
    """The batcher lives in this process (``--workers 1``, or each worker with ``--no-share``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.batcher = build_batcher(config, timed=True)
        self.registry = metrics_registry(self.batcher)
        self.timings = Timings()

    async def start(self) -> None:
        """Load (and warm up) the model in each worker thread, then freeze the heap."""
        await asyncio.to_thread(self.batcher.start)
        freeze_heap(self.config)

    async def close(self) -> None:
        """Close the batcher; a batch still running is not waited for past a bound (daemon worker)."""
        await asyncio.to_thread(self.batcher.close, CLOSE_JOIN_SECONDS)

    async def acall(self, value: str, *, timeout: float | None = None, **options: Any) -> Any:
        """The embedding of value, its time recorded in ``timings``."""
        called = time.perf_counter()
        vector, started, finished = await self.batcher.acall(value, timeout=timeout, **options)
        self.timings.model(called, started, finished, time.perf_counter())
        return vector

    def explain_closed(self, exc: Closed) -> tuple[str, int] | None:
        """A worker died (its error is the cause): say so; else the batcher was closed: stopping."""
        if exc.__cause__ is not None:
            return "model worker failed; the server needs a restart (see /healthz)", 10
        return None

    async def stats(self) -> dict[str, Any]:
        """The batcher's counters."""
        return stats_dict(self.batcher)

    async def healthy(self) -> bool:
        """BatchedFn.healthy."""
        return bool(self.batcher.healthy)

    async def metrics(self) -> bytes | None:
        """This batcher's Prometheus metrics."""
        return None if self.registry is None else exposition(self.registry)


if sys.version_info >= (3, 11):
    def _bounded(coro: Coroutine[Any, Any, T], seconds: float) -> Coroutine[Any, Any, T]:
        async def run() -> T:
            async with asyncio.timeout(seconds):
                return await coro
        return run()
else:  # pragma: no cover - Python 3.10
    def _bounded(coro: Coroutine[Any, Any, T], seconds: float) -> Coroutine[Any, Any, T]:
        return asyncio.wait_for(coro, seconds)


class _Link:
    """A connection by name to a shared function that reconnects (one attempt at a time) once it closed.

    The model process may be restarted by the supervisor: calls in flight
    then get Closed, and the next call connects to the new one.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.remote: Any = None
        self._lock: asyncio.Lock | None = None
        self._retry_at = 0.0
        self.closing = False

    async def open(self, seconds: float) -> None:
        """Connect, waiting up to seconds for the name to appear (the model may still be loading)."""
        from batched_fn import connect

        self.remote = await asyncio.to_thread(connect, self.name, seconds)

    async def get(self) -> Any:
        """The live connection, reconnecting if the old one closed; Closed if there is none now."""
        remote = self.remote
        if remote is not None and not remote.closed:
            return remote
        if self.closing:
            raise Closed("the server is shutting down")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.remote is not None and not self.remote.closed:
                return self.remote
            if time.monotonic() < self._retry_at:
                raise Closed("the model process is unavailable (restarting)")
            from batched_fn import connect

            try:
                fresh = await asyncio.to_thread(connect, self.name, RECONNECT_SECONDS)
            except (TimeoutError, OSError) as exc:
                self._retry_at = time.monotonic() + RECONNECT_PAUSE
                raise Closed("the model process is unavailable (restarting)") from exc
            old, self.remote = self.remote, fresh
            if old is not None:
                await asyncio.to_thread(old.close)
            log.warning("reconnected to the model process (pid %s)", fresh.owner_pid)
            return fresh

    async def close(self) -> None:
        """Close the connection; later calls get Closed."""
        self.closing = True
        if self.remote is not None:
            await asyncio.to_thread(self.remote.close)


class SharedBackend:
    """The batcher of the model process, shared as name (``--workers N``).

    Every wait on that process is bounded: a call by its timeout (the client
    raises TimeoutError itself; :data:`TIMEOUT_GUARD` later this worker gives
    up on its own), a control question by :data:`CONTROL_SECONDS`.  A stuck
    model process thus costs 504s and 503s, never a silent worker.
    """

    def __init__(self, config: ServerConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.batcher: Any = None
        self.timings = Timings()
        self._model = _Link(name)
        self._control = _Link(control_name(name))

    async def start(self) -> None:
        """Connect (the model process may still be loading), then freeze the heap."""
        await self._model.open(MODEL_LOAD_SECONDS)
        await self._control.open(MODEL_LOAD_SECONDS)
        self.batcher = self._model.remote
        freeze_heap(self.config)

    async def close(self) -> None:
        """Close both connections."""
        await self._model.close()
        await self._control.close()

    async def acall(self, value: str, *, timeout: float | None = None, **options: Any) -> Any:
        """The embedding of value from the model process; TimeoutError on time even if it is stuck."""
        remote = await self._model.get()
        self.batcher = remote
        called = time.perf_counter()
        call = remote.acall(value, timeout=timeout, **options)
        if timeout is None:
            out = await call
        else:
            try:
                out = await _bounded(call, timeout + TIMEOUT_GUARD)
            except TimeoutError:
                raise TimeoutError(f"the model process did not answer within {timeout}s") from None
        vector, started, finished = out
        self.timings.model(called, started, finished, time.perf_counter())
        return vector

    def explain_closed(self, exc: Closed) -> tuple[str, int] | None:
        """The model process went away (the supervisor restarts it), unless this worker is stopping."""
        if self._model.closing:
            return None
        return "the model process is unavailable (restarting); retry shortly", 2

    async def _ask(self, question: str) -> Any:
        remote = await _bounded(self._control.get(), CONTROL_SECONDS)
        return await _bounded(remote.acall(question, timeout=CONTROL_SECONDS), CONTROL_SECONDS)

    async def stats(self) -> dict[str, Any]:
        """The shared batcher's counters (every worker's calls), within CONTROL_SECONDS."""
        return cast("dict[str, Any]", await self._ask("stats"))

    async def healthy(self) -> bool:
        """True if the model process answers within CONTROL_SECONDS that its batcher is healthy."""
        try:
            return bool(await self._ask("healthy"))
        except Exception:   # the model process is gone, restarting or stuck
            return False

    async def metrics(self) -> bytes | None:
        """The shared batcher's Prometheus metrics, within CONTROL_SECONDS."""
        return cast("bytes | None", await self._ask("metrics"))


# ---------------------------------------------------------------- the model process's end


def _control_handler(fn: BatchedFn[Any, Any], gc_pauses: GcPauses) -> Callable[[list[str]], list[Any]]:
    registry = metrics_registry(fn)

    def answer(questions: list[str]) -> list[Any]:
        answers: dict[str, Any] = {}
        for q in set(questions):
            if q == "stats":
                answers[q] = dict(stats_dict(fn), model_gc=gc_pauses.summary())
            elif q == "healthy":
                answers[q] = fn.healthy
            elif q == "metrics":
                answers[q] = None if registry is None else exposition(registry)
            else:
                answers[q] = Failed(UnknownQuestion(f"unknown control question {q!r}; expected one of {QUESTIONS}"))
        return [answers[q] for q in questions]

    return answer


class ModelService:
    """The model process's side: the batcher shared as name, its control channel as ``name-control``."""

    def __init__(self, config: ServerConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.fn = build_batcher(config, timed=True)
        self.gc_pauses = GcPauses()
        self.control = batched_fn(_control_handler(self.fn, self.gc_pauses), max_batch_size=16, max_delay=0.0)

    def start(self) -> None:
        """Load the model (the loaders warm it up), share both functions, freeze the heap."""
        self.fn.start()
        self.control.start()
        self.fn.share(self.name)
        self.control.share(control_name(self.name))
        freeze_heap(self.config)
        self.gc_pauses.start()

    def close(self) -> None:
        """Withdraw both names; a batch still running is not waited for past the bound."""
        self.gc_pauses.stop()
        self.control.close(CLOSE_JOIN_SECONDS)
        self.fn.close(CLOSE_JOIN_SECONDS)


def serve_model(config: ServerConfig, name: str) -> ModelService:
    """Start the model process's service (see ModelService); the caller closes it."""
    service = ModelService(config, name)
    try:
        service.start()
    except BaseException:
        service.close()
        raise
    return service
