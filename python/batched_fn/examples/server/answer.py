"""Answering one ``POST /embed``: read and check the body, call the model, map each outcome to a status.

Every error is JSON ``{"error": "..."}`` with its status: 422 (bad body),
413 (too large), 503 + ``Retry-After`` (full, closing, model unavailable, the
event loop too far behind to answer in time),
504 (timeout), 500 (the model failed on this input).  :class:`InFlight`
gives every accepted request a deliberate answer when the server stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Mapping, Protocol, Sequence

from starlette.responses import JSONResponse, Response
from pydantic_core import to_json   # FastAPI depends on pydantic, and so on pydantic_core

from batched_fn import BatchedFn, Closed, Full

from .config import PRIORITY_RANGE, ServerConfig
from .lag import LoopLag, overloaded_message
from .timing import Timings

__all__ = ["Caller", "EmbedRequest", "InFlight", "embed_response", "error", "read_request", "shutting_down"]

log = logging.getLogger("batched_fn.examples.server")


class Caller(Protocol):
    """What /embed calls: a BatchedFn, a RemoteFn, or a backend standing for one."""

    async def acall(self, value: str, *, timeout: float | None = None) -> Any:
        """The embedding of value (priority= is passed as well when a request asks for one)."""
        ...


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A JSON error answer: ``{"error": message}`` with status and headers."""
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def shutting_down() -> JSONResponse:
    """The 503 a request gets while the server stops."""
    return error(503, "server is shutting down", {"Retry-After": "1"})


def retry_after(exc: Full) -> int:
    """Whole seconds for ``Retry-After`` from ``Full.retry_after`` (rounded up, at least 1)."""
    estimate = getattr(exc, "retry_after", 0.0)
    if not (isinstance(estimate, (int, float)) and math.isfinite(estimate)):
        return 1
    return max(1, math.ceil(estimate))


class EmbedRequest:
    """A checked /embed body: the text, the seconds it may wait, its priority."""

    __slots__ = ("text", "timeout", "priority")

    def __init__(self, text: str, timeout: float, priority: int) -> None:
        self.text = text
        self.timeout = timeout
        self.priority = priority


def read_request(body: bytes, config: ServerConfig) -> EmbedRequest | Response:
    """The text, timeout and priority of an /embed body, or the error response."""
    try:
        payload = json.loads(body)
    except RecursionError:   # e.g. thousands of nested lists: json gives up deep in its parser
        return error(422, "body is not valid JSON: nested too deeply")
    except ValueError as exc:  # also bytes that are not UTF-8 (UnicodeDecodeError)
        return error(422, f"body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return error(422, f'body must be a JSON object like {{"text": "..."}} (got {type(payload).__name__})')
    if "text" not in payload:
        return error(422, "missing field 'text'")
    text = payload["text"]
    if not isinstance(text, str):
        return error(422, f"field 'text' must be a string (got {type(text).__name__})")
    if len(text) > config.max_text_chars:
        return error(413, f"field 'text' has {len(text)} characters; the limit is {config.max_text_chars}")
    if not text.isascii():
        # JSON may spell a lone surrogate ("\ud800"); no model can take it, and
        # in a batch it would fail its batch-mates too, so refuse it here.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return error(422, f"field 'text' cannot be encoded as UTF-8: {exc.reason} at character {exc.start}")
    timeout = payload.get("timeout", config.timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        return error(422, f"field 'timeout' must be a number of seconds > 0 (got {timeout!r})")
    priority = payload.get("priority", 0)
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        return error(422, f"field 'priority' must be an integer from {low} to {high} (got {priority!r})")
    # min() also tames inf and ints too big for a float (NaN failed "> 0" above)
    return EmbedRequest(text, float(min(timeout, config.timeout)), priority)


class _Disconnected(Exception):
    """The client hung up before its body arrived: nobody is left to answer."""


async def _read_body(request: Any, limit: int) -> bytes | Response:
    """The whole body, or a 413 response once it passes limit bytes.

    Reads the ASGI messages directly: a chunked body has no Content-Length, so
    its size is counted as it comes.  Raises _Disconnected if the client left
    (also when the server closed a body that took too long, see ``reading``).
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return error(413, f"body has {length} bytes; the limit is {limit}")
    body = b""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        # `in` and subscripts, not message.get(): on a free-threaded CPython, dict.get on the
        # dicts granian's Rust threads make contends for the dict's lock (measured: 2.5 million
        # sched_yield calls in 3 s and 40 % of the throughput of a bare app); lookups do not
        if "body" in message:
            body += message["body"]
        if len(body) > limit:
            return error(413, f"body has more than {limit} bytes; the limit is {limit}")
        if not ("more_body" in message and message["more_body"]):
            return body


class InFlight:
    """The /embed requests being answered, so a shutdown can give each one a deliberate answer.

    On SIGTERM (``begin_shutdown``): new requests get 503 at once; requests
    still sending their body get 503 at once (a half-sent body must not hold
    the shutdown up); requests waiting for the model get until ``grace``
    seconds, then 503.  A request accepted before the signal has a timeout of
    at most ``--timeout``, so with grace = ``--timeout`` every one of them was
    either answered or answered 504 by then.

    The answer is given by cancelling the request's task and catching that
    cancellation in ``embed_response`` (``answers_cancel``).
    """

    def __init__(self) -> None:
        self.closing = False
        self.reading: set[asyncio.Task[Any]] = set()    # tasks reading their body
        self.waiting: set[asyncio.Task[Any]] = set()    # tasks waiting for their batch
        self._cancelled: set[asyncio.Task[Any]] = set()  # tasks this object cancelled

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking requests and schedule the answers; call on the event loop."""
        if self.closing:
            return
        self.closing = True
        self._cancel(self.reading)
        asyncio.get_running_loop().call_later(grace, self._cancel, self.waiting)

    def _cancel(self, tasks: set[asyncio.Task[Any]]) -> None:
        for task in list(tasks):
            self._cancelled.add(task)
            task.cancel()

    def answers_cancel(self, task: asyncio.Task[Any]) -> bool:
        """True if task was cancelled by the shutdown (then it must answer 503), not by anyone else."""
        if task not in self._cancelled:
            return False
        self._cancelled.discard(task)
        if hasattr(task, "uncancel"):   # Python 3.11+: the task is no longer being cancelled
            task.uncancel()
        return True


def _embed_json(vector: Sequence[float]) -> Response:
    # pydantic_core (a FastAPI dependency) writes floats ~10x faster than
    # json.dumps, whose float repr was the largest cost of a request here.
    return Response(to_json({"embedding": vector}), media_type="application/json")


async def embed_response(fn: Caller, config: ServerConfig, request: Any, inflight: InFlight | None = None,
                         timings: Timings | None = None, lag: LoopLag | None = None) -> Response:
    """Answer one ``POST /embed`` (a Starlette request) through fn; every error is a JSON status.

    Shared by the FastAPI app and the Ray Serve deployment.  With inflight,
    a shutdown answers this request deliberately (see InFlight); with
    timings, an answered request's time is recorded there; with lag, the
    event loop's lag times ``--loop-lag-factor`` comes off the request's
    timeout (its wait before the app read it and for its answer to be
    written, see ``lag``), and a request with nothing left gets 503 at once.
    """
    entered = time.perf_counter()
    task = asyncio.current_task()
    assert task is not None                       # ASGI servers run each request in a task
    if inflight is not None and inflight.closing:
        return shutting_down()
    behind = 0.0 if lag is None else lag.behind()
    if behind >= config.timeout:                  # no request body can ask for more than --timeout
        return _overloaded(lag)
    parsed = await _receive(request, config, task, inflight)
    if not isinstance(parsed, EmbedRequest):
        return parsed
    budget = parsed.timeout - behind
    if budget <= 0.0:
        return _overloaded(lag)
    if inflight is not None:
        inflight.waiting.add(task)
    called = time.perf_counter()
    try:
        vector = await _call(fn, parsed, budget, task, inflight)
    finally:
        if inflight is not None:
            inflight.waiting.discard(task)
    if isinstance(vector, Response):
        return vector
    response = _embed_json(vector)
    if timings is not None:
        now = time.perf_counter()
        timings.http(now - entered, now - called)
    return response


async def _receive(request: Any, config: ServerConfig, task: asyncio.Task[Any],
                   inflight: InFlight | None) -> EmbedRequest | Response:
    """The checked body, or the answer for a bad one (or for a shutdown while it was still coming)."""
    if inflight is not None:
        inflight.reading.add(task)
    try:
        body = await _read_body(request, config.max_body_bytes)
    except asyncio.CancelledError:
        if inflight is not None and inflight.answers_cancel(task):
            return shutting_down()
        raise
    except _Disconnected:
        return Response(status_code=400)          # never sent: the client is gone
    finally:
        if inflight is not None:
            inflight.reading.discard(task)
    if not isinstance(body, bytes):
        return body
    return read_request(body, config)


def _overloaded(lag: Any) -> Response:
    lag.count_shed()
    return error(503, overloaded_message(lag.seconds()), {"Retry-After": "1"})


async def _call(fn: Caller, parsed: EmbedRequest, budget: float, task: asyncio.Task[Any],
                inflight: InFlight | None) -> Any:
    """The model's output for the request (within budget seconds), or the error answer each outcome maps to."""
    try:
        if parsed.priority:
            return await fn.acall(parsed.text, timeout=budget, priority=parsed.priority)  # type: ignore[call-arg]
        return await fn.acall(parsed.text, timeout=budget)
    except asyncio.CancelledError:
        if inflight is not None and inflight.answers_cancel(task):
            return error(503, "server shut down before the model answered", {"Retry-After": "1"})
        raise
    except Full as exc:
        retry = retry_after(exc)
        return error(503, f"server busy: {exc.queued} requests queued; retry in {retry}s",
                     {"Retry-After": str(retry)})
    except TimeoutError:
        return error(504, f"request was not answered within {parsed.timeout}s")
    except Closed as exc:
        return _closed_response(fn, exc)
    except Exception as exc:  # the model failed on this input (or its batch)
        log.exception("model failed")
        return error(500, f"model failed: {type(exc).__name__}")


def _closed_response(fn: Caller, exc: Closed) -> Response:
    # A worker died (its error is the cause) or the model process went away
    # (a backend says which, and when to retry); else the batcher was closed:
    # the server is stopping.
    explain = getattr(fn, "explain_closed", None)
    if explain is not None:
        explained = explain(exc)
    elif exc.__cause__ is not None or not isinstance(fn, BatchedFn):
        explained = ("model worker failed; the server needs a restart (see /healthz)", 10)
    else:
        explained = None
    if explained is None:
        return shutting_down()
    message, retry = explained
    log.error("model unavailable: %s", exc)
    return error(503, message, {"Retry-After": str(retry)})
