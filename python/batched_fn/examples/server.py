"""A sentence-embedding HTTP service with dynamic batching (FastAPI + uvicorn).

Run it::

    python -m batched_fn.examples.server --port 8000            # all-MiniLM-L6-v2, offline
    python -m batched_fn.examples.server --model toy --port 8000  # tiny stand-in, no torch

Endpoints:

- ``POST /embed`` with ``{"text": "...", "timeout": 2.5}`` (timeout optional)
  returns ``{"embedding": [...]}``.
- ``GET /stats``: the batcher's :class:`batched_fn.Stats` as JSON.
- ``GET /healthz``: 200 while the batcher is healthy, else 503.
- ``GET /metrics``: Prometheus metrics (with ``prometheus_client`` installed).

Errors, as ``{"error": "..."}``: 503 + ``Retry-After`` when the queue is full,
the server is closing or the model worker died; 504 when a request was not
taken into a batch within its timeout; 422 for a body that is not JSON (or
nested too deeply), not an object, or lacks a string ``text`` that UTF-8 can
encode; 413 for an oversized body or text; 500 when the model failed on that
request's input.

``--workers N`` (N > 1) runs N HTTP worker processes on one listening socket
and ONE model process: it loads the model once and shares its batcher
(``BatchedFn.share``); every worker ``connect()``s to it, so one batch holds
requests from all workers, and /stats and /metrics in any worker report that
one batcher.  ``--no-share`` gives each worker its own model instead.  The
process started is a supervisor: it forwards SIGTERM to the workers, stops the
model process after them, and exits 0.  If the model process dies, the workers
answer 503 (and /healthz 503).

SIGINT/SIGTERM: the server stops accepting, answers requests still sending
their body with 503 at once, gives requests waiting for the model up to
``--timeout`` seconds (then 503), and exits 0 within ``--timeout`` + a few
seconds, however long the running batch takes.

Every knob is a flag and an environment variable (``--max-batch-size`` /
``BATCHED_FN_MAX_BATCH_SIZE``, ...); flags win.  See ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any, AsyncIterator, Callable, Mapping, Sequence, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic_core import to_json   # FastAPI depends on pydantic, and so on pydantic_core

from batched_fn import BatchedFn, Closed, Full, batched_fn


from . import models

__all__ = ["ServerConfig", "InFlight", "parse_config", "build_batcher", "embed_response", "create_app", "main"]

log = logging.getLogger("batched_fn.examples.server")

ENV_PREFIX = "BATCHED_FN_"

#: seconds the shutdown waits for a worker still running a batch (it is a daemon thread)
CLOSE_JOIN_SECONDS = 2.0
#: --workers > 1: seconds an HTTP worker waits for the model process to share its batcher
MODEL_LOAD_SECONDS = 600.0
#: --workers > 1: seconds a /stats, /metrics or /healthz question to the model process may take
CONTROL_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every knob of the example server; see ``--help`` for what each one does."""

    model: str = "minilm"
    max_batch_size: int = 32
    max_delay: float | str = "auto"
    channel_cap: int | None = 256
    num_workers: int = 1
    timeout: float = 10.0
    max_text_chars: int = 2000
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    torch_threads: int = 1
    toy_dim: int = 32
    toy_batch_ms: float = 0.0
    toy_item_ms: float = 0.0
    workers: int = 1
    no_share: bool = False

    @property
    def max_body_bytes(self) -> int:
        """The largest body read: the text limit in escaped JSON (\\uXXXX = 6 bytes), plus room."""
        return self.max_text_chars * 6 + 4096


def _cap(value: str) -> int | None:
    if value.strip().lower() in ("none", "unbounded", "0"):
        return None
    return int(value)


def _delay(value: str) -> float | str:
    if value.strip().lower() == "auto":
        return "auto"
    return float(value)


_delay.__name__ = "seconds or 'auto'"   # argparse's error names it: "invalid seconds or 'auto' value"


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


# (field, type, help): each becomes --field-name and BATCHED_FN_FIELD_NAME
_KNOBS: Sequence[tuple[str, Callable[[str], Any], str]] = (
    ("model", str, f"model to serve: one of {sorted(models.MODELS)}"),
    ("max_batch_size", int, "most inputs per batch (1 = one request at a time)"),
    ("max_delay", _delay, "seconds a batch waits for more inputs after its first one, or auto "
                          "(adapts to the model's speed and the arrivals)"),
    ("channel_cap", _cap, "most requests queued before 503 (none = unbounded)"),
    ("num_workers", int, "worker threads, each with its own model"),
    ("timeout", float, "default (and largest) seconds a request may wait for a batch before 504"),
    ("max_text_chars", int, "longest text accepted (longer: 413)"),
    ("host", str, "address to bind"),
    ("port", int, "port to bind (0 = any free port)"),
    ("log_level", str, "uvicorn log level"),
    ("torch_threads", int, "minilm: torch intra-op threads (0 = torch's default)"),
    ("toy_dim", int, "toy model: embedding size"),
    ("toy_batch_ms", float, "toy model: milliseconds of work per batch"),
    ("toy_item_ms", float, "toy model: milliseconds of work per input"),
    ("workers", int, "HTTP worker processes; more than 1: they share one model process"),
)


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Read the knobs: defaults, then ``BATCHED_FN_*`` environment variables, then flags."""
    env = os.environ if env is None else env
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="python -m batched_fn.examples.server",
                                     description="Sentence-embedding server with dynamic batching.")
    for name, kind, help_text in _KNOBS:
        env_name = ENV_PREFIX + name.upper()
        default = getattr(defaults, name)
        if env_name in env:
            try:
                default = kind(env[env_name])
            except ValueError:
                parser.error(f"invalid {env_name} value: {env[env_name]!r}")
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                            help=f"{help_text} [env {env_name}, default {default!r}]")
    no_share_env = ENV_PREFIX + "NO_SHARE"
    try:
        no_share_default = _flag(env.get(no_share_env, ""))
    except ValueError:
        parser.error(f"invalid {no_share_env} value: {env[no_share_env]!r}")
    parser.add_argument("--no-share", action="store_true", default=no_share_default,
                        help=f"with --workers > 1: each worker loads its own model instead of sharing one "
                             f"[env {no_share_env}=1]")
    args = parser.parse_args(argv)
    config = ServerConfig(**vars(args))
    if config.model not in models.MODELS:
        parser.error(f"invalid model value: expected one of {sorted(models.MODELS)} (got {config.model!r})")
    if not (config.timeout > 0 and math.isfinite(config.timeout)):
        parser.error(f"invalid timeout value: expected seconds > 0 (got {config.timeout!r})")
    if config.workers < 1:
        parser.error(f"invalid workers value: expected >= 1 (got {config.workers!r})")
    if config.max_text_chars < 1:
        parser.error(f"invalid max_text_chars value: expected >= 1 (got {config.max_text_chars!r})")
    return config


def build_batcher(config: ServerConfig) -> BatchedFn[str, list[float]]:
    """The batched embedding function; each worker loads its own model in its thread."""
    if config.model == "toy":
        options = {"dim": config.toy_dim, "batch_ms": config.toy_batch_ms, "item_ms": config.toy_item_ms}
    else:
        options = {"threads": config.torch_threads}

    def load_model() -> models.Embedder:
        return models.load(config.model, **options)

    def embed(texts: list[str], model: models.Embedder) -> list[list[float]]:
        # a Failed(exc) slot fails only that text's caller; batched_fn's type
        # hints do not spell Failed outputs yet, hence the cast
        return cast("list[list[float]]", model.embed(texts))

    return batched_fn(embed, max_batch_size=config.max_batch_size, max_delay=config.max_delay,
                      channel_cap=config.channel_cap, num_workers=config.num_workers,
                      context={"model": load_model})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _read_request(body: bytes, config: ServerConfig) -> tuple[str, float] | Response:
    """The text and timeout of an /embed body, or the error response."""
    try:
        payload = json.loads(body)
    except RecursionError:   # e.g. thousands of nested lists: json gives up deep in its parser
        return _error(422, "body is not valid JSON: nested too deeply")
    except ValueError as exc:  # also bytes that are not UTF-8 (UnicodeDecodeError)
        return _error(422, f"body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return _error(422, f'body must be a JSON object like {{"text": "..."}} (got {type(payload).__name__})')
    if "text" not in payload:
        return _error(422, "missing field 'text'")
    text = payload["text"]
    if not isinstance(text, str):
        return _error(422, f"field 'text' must be a string (got {type(text).__name__})")
    if len(text) > config.max_text_chars:
        return _error(413, f"field 'text' has {len(text)} characters; the limit is {config.max_text_chars}")
    if not text.isascii():
        # JSON may spell a lone surrogate ("\ud800"); no model can take it, and
        # in a batch it would fail its batch-mates too, so refuse it here.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return _error(422, f"field 'text' cannot be encoded as UTF-8: {exc.reason} at character {exc.start}")
    timeout = payload.get("timeout", config.timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        return _error(422, f"field 'timeout' must be a number of seconds > 0 (got {timeout!r})")
    # min() also tames inf and ints too big for a float (NaN failed "> 0" above)
    return text, float(min(timeout, config.timeout))


class _Disconnected(Exception):
    """The client hung up before its body arrived: nobody is left to answer."""


async def _read_body(request: Request, limit: int) -> bytes | Response:
    """The whole body, or a 413 response once it passes limit bytes.

    Reads the ASGI messages directly: a chunked body has no Content-Length, so
    its size is counted as it comes.  Raises _Disconnected if the client left.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return _error(413, f"body has {length} bytes; the limit is {limit}")
    body = b""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        body += message.get("body", b"")
        if len(body) > limit:
            return _error(413, f"body has more than {limit} bytes; the limit is {limit}")
        if not message.get("more_body", False):
            return body


class InFlight:
    """The /embed requests being answered, so a shutdown can give each one a deliberate answer.

    On SIGTERM (``begin_shutdown``): new requests get 503 at once; requests
    still sending their body get 503 at once (a half-sent body must not hold
    the shutdown up); requests waiting for the model get until ``grace``
    seconds, then 503.  A request accepted before the signal has a timeout of
    at most ``--timeout``, so with grace = ``--timeout`` every one of them was
    either taken into a batch or answered 504 by then.

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


def _shutting_down() -> JSONResponse:
    return _error(503, "server is shutting down", {"Retry-After": "1"})


def _embed_json(vector: Sequence[float]) -> Response:
    # pydantic_core (a FastAPI dependency) writes floats ~10x faster than
    # json.dumps, whose float repr was the largest cost of a request here.
    return Response(to_json({"embedding": vector}), media_type="application/json")


async def embed_response(fn: BatchedFn[str, list[float]], config: ServerConfig, request: Any,
                         inflight: InFlight | None = None) -> Response:
    """Answer one ``POST /embed`` (a Starlette request) through fn; every error is a JSON status.

    Shared by the FastAPI app and the Ray Serve deployment.  With inflight,
    a shutdown answers this request deliberately (see InFlight).
    """
    task = asyncio.current_task()
    assert task is not None                       # ASGI servers run each request in a task
    if inflight is not None:
        if inflight.closing:
            return _shutting_down()
        inflight.reading.add(task)
    try:
        body = await _read_body(request, config.max_body_bytes)
    except asyncio.CancelledError:
        if inflight is not None and inflight.answers_cancel(task):
            return _shutting_down()
        raise
    except _Disconnected:
        return Response(status_code=400)          # never sent: the client is gone
    finally:
        if inflight is not None:
            inflight.reading.discard(task)
    if not isinstance(body, bytes):
        return body
    parsed = _read_request(body, config)
    if not isinstance(parsed, tuple):
        return parsed
    text, timeout = parsed
    if inflight is not None:
        inflight.waiting.add(task)
    try:
        vector = await fn.acall(text, timeout=timeout)
    except asyncio.CancelledError:
        if inflight is not None and inflight.answers_cancel(task):
            return _error(503, "server shut down before the model answered", {"Retry-After": "1"})
        raise
    except Full as exc:
        retry = max(1, math.ceil(exc.retry_after))
        return _error(503, f"server busy: {exc.queued} requests queued; retry in {retry}s",
                      {"Retry-After": str(retry)})
    except TimeoutError:
        return _error(504, f"request was not taken into a batch within {timeout}s")
    except Closed as exc:
        # a worker died (its error is the cause), or the shared model process went away
        if exc.__cause__ is not None or not isinstance(fn, BatchedFn):
            log.error("model worker failed: %s", exc)
            return _error(503, "model worker failed; the server needs a restart (see /healthz)",
                          {"Retry-After": "10"})
        return _shutting_down()
    except Exception as exc:  # the model failed on this input (or its batch)
        log.exception("model failed")
        return _error(500, f"model failed: {type(exc).__name__}")
    finally:
        if inflight is not None:
            inflight.waiting.discard(task)
    return _embed_json(vector)


def _stats_dict(fn: BatchedFn[Any, Any]) -> dict[str, Any]:
    data = dataclasses.asdict(fn.stats())
    data["batches_by_reason"] = dict(data["batches_by_reason"])
    return data


def _metrics_registry(fn: BatchedFn[Any, Any]) -> Any:
    """A Prometheus registry exporting fn (prefix ``embed_``), or None without prometheus_client."""
    try:
        from prometheus_client import CollectorRegistry

        from batched_fn.prometheus import register
    except ImportError:  # the [prometheus] extra is optional
        return None
    registry = CollectorRegistry()
    register(fn, "embed", registry=registry)
    return registry


def _exposition(registry: Any) -> bytes:
    from prometheus_client import generate_latest

    return cast(bytes, generate_latest(registry))


class _Backend:
    """Where a server process sends /embed and where it reads /stats, /metrics and health.

    In-process (``shared=None``): the batcher lives here.  Shared: the model
    process's batcher, reached through ``connect`` once the app starts, and
    its stats, health and metrics through a second shared function (see
    ``_model_process``) so that they count every worker.
    """

    def __init__(self, config: ServerConfig, shared: str | None) -> None:
        self.shared = shared
        self.fn: Any = None if shared else build_batcher(config)
        self.registry = None if shared else _metrics_registry(self.fn)
        self.control: Any = None

    async def start(self) -> None:
        if self.shared is None:
            await asyncio.to_thread(self.fn.start)   # loads (and warms up) the model in each worker
            return
        from batched_fn import connect
        # the model process may still be loading its model: wait for it
        self.fn = await asyncio.to_thread(connect, self.shared, MODEL_LOAD_SECONDS)
        self.control = await asyncio.to_thread(connect, self.shared + "-control", MODEL_LOAD_SECONDS)

    async def close(self) -> None:
        if self.shared is None:
            # A batch still running (one that outlived the shutdown grace) is not
            # waited for past a bound: its worker is a daemon thread.
            await asyncio.to_thread(self.fn.close, CLOSE_JOIN_SECONDS)
        else:
            for remote in (self.fn, self.control):
                if remote is not None:
                    await asyncio.to_thread(remote.close)

    async def _ask(self, what: str) -> Any:
        return await self.control.acall(what, timeout=CONTROL_SECONDS)

    async def stats(self) -> dict[str, Any]:
        if self.shared is None:
            return _stats_dict(self.fn)
        return cast("dict[str, Any]", await self._ask("stats"))

    async def healthy(self) -> bool:
        if self.shared is None:
            return bool(self.fn.healthy)
        if self.fn is None or self.fn.closed:
            return False
        try:
            return bool(await self._ask("healthy"))
        except Exception:   # the model process is gone or stuck
            return False

    async def metrics(self) -> bytes | None:
        if self.shared is None:
            return None if self.registry is None else _exposition(self.registry)
        return cast("bytes | None", await self._ask("metrics"))


def create_app(config: ServerConfig, shared: str | None = None) -> FastAPI:
    """The FastAPI app: a batcher started at startup (the model loads then), closed at shutdown.

    With shared (a name given to ``BatchedFn.share`` by the model process),
    the app connects to that batcher at startup instead of building its own.
    """
    backend = _Backend(config, shared)
    inflight = InFlight()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        app.state.batcher = backend.fn
        on_ready = getattr(app.state, "on_ready", None)
        if on_ready is not None:
            on_ready()
        else:
            print(f"batched_fn server ready on http://{config.host}:{app.state.port} "
                  f"(model={config.model}, max_batch_size={config.max_batch_size})", flush=True)
        try:
            yield
        finally:
            await backend.close()   # every request has its answer by now

    app = FastAPI(title="batched_fn embedding server", lifespan=lifespan)
    app.state.batcher = backend.fn
    app.state.config = config
    app.state.port = config.port
    app.state.inflight = inflight

    async def embed(request: Request) -> Response:
        """Embed one text; it is batched with concurrent requests."""
        return await embed_response(backend.fn, config, request, inflight)

    # A plain Starlette route, not @app.post: the endpoint reads the request
    # itself, so FastAPI's per-request dependency solving would be pure cost.
    # (It is left out of /docs; the module docstring documents it.)
    app.add_route("/embed", embed, methods=["POST"])

    @app.get("/stats")
    async def stats() -> Any:
        """The batcher's counters (batched_fn.Stats; with --workers, the shared batcher's) and the knobs."""
        try:
            data = await backend.stats()
        except Exception as exc:   # shared: the model process is gone
            return _error(503, f"model process unavailable: {type(exc).__name__}", {"Retry-After": "10"})
        data["config"] = dataclasses.asdict(config)
        data["pid"] = os.getpid()   # the process that answered (with --workers: an HTTP worker)
        return data

    @app.get("/healthz")
    async def healthz() -> Any:
        """200 while every worker runs and calls are accepted (BatchedFn.healthy), else 503."""
        if inflight.closing:
            return _shutting_down()
        if await backend.healthy():
            return {"status": "ok"}
        return _error(503, "unhealthy: the batcher is closed or a model worker failed")

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus exposition of the batcher's metrics (prefix ``embed_``)."""
        try:
            text = await backend.metrics()
        except Exception as exc:
            return _error(503, f"model process unavailable: {type(exc).__name__}", {"Retry-After": "10"})
        if text is None:
            return _error(404, "prometheus_client is not installed: pip install 'batched_fn[prometheus]'")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# --workers > 1: the supervisor starts its children with the same flags and
# says in these environment variables what each one is
_ROLE_ENV = "BATCHED_FN__ROLE"          # "model" or "http"
_SHARED_ENV = "BATCHED_FN__SHARED"      # the name the model process shares under
_LISTEN_ENV = "BATCHED_FN__LISTEN_FD"   # http: the listening socket, inherited
_READY_ENV = "BATCHED_FN__READY_FD"     # a pipe to write one byte to once ready


def _signal_ready() -> None:
    fd = int(os.environ[_READY_ENV])
    os.write(fd, b"1")
    os.close(fd)


def _parent_gone(parent: int) -> bool:
    return os.getppid() != parent


def _model_process(config: ServerConfig, name: str) -> None:
    """Load the model once, share the batcher as name and its stats as name-control; serve until SIGTERM."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the supervisor stops this process last
    parent = os.getppid()
    fn = build_batcher(config)
    registry = _metrics_registry(fn)

    def answer(questions: list[str]) -> list[Any]:
        answers: dict[str, Any] = {}
        for q in set(questions):
            if q == "stats":
                answers[q] = _stats_dict(fn)
            elif q == "healthy":
                answers[q] = fn.healthy
            else:
                answers[q] = None if registry is None else _exposition(registry)
        return [answers[q] for q in questions]

    control = batched_fn(answer, max_batch_size=16, max_delay=0.0)
    fn.start()
    control.start()
    fn.share(name)
    control.share(name + "-control")
    _signal_ready()
    while not stop.wait(0.25):
        if _parent_gone(parent):   # the supervisor was killed: do not outlive it
            break
    # a batch still running is not waited for past the bound (daemon worker threads)
    control.close(CLOSE_JOIN_SECONDS)
    fn.close(CLOSE_JOIN_SECONDS)


def _watch_parent(parent: int) -> None:
    """In an HTTP worker: SIGTERM this process (a graceful stop) if the supervisor disappears."""
    import signal
    import threading

    def watch() -> None:
        import time
        while not _parent_gone(parent):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="batched_fn-server-parent", daemon=True).start()


def _serve(config: ServerConfig, app: FastAPI, sock: Any) -> bool:
    """Run uvicorn on the listening socket until SIGINT/SIGTERM; True if it started."""
    import signal

    import uvicorn

    inflight: InFlight = app.state.inflight

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            # uvicorn calls this on SIGINT/SIGTERM, on the event loop.  Requests
            # waiting for the model get --timeout seconds (see InFlight).
            inflight.begin_shutdown(grace=config.timeout)
            await super().shutdown(sockets)

    # uvicorn's own bound on the shutdown is a backstop: InFlight has answered
    # every request before it; past it uvicorn would cancel them without answer.
    server = Server(uvicorn.Config(app, log_level=config.log_level, access_log=False,
                                   timeout_graceful_shutdown=math.ceil(config.timeout) + 2))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal
    # to the handlers it found: make those no-ops so a graceful stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return bool(server.started)


def _listen(config: ServerConfig) -> Any:
    import socket

    # bind here so --port 0 works and the ready line names the real port
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    # listen now: the ready line is printed at startup, before uvicorn serves the
    # socket, and a client that reads it and connects at once must be queued, not refused
    sock.listen(2048)
    return sock


class _Child:
    """A child process of the supervisor, with the pipe it says 'ready' on."""

    def __init__(self, role: str, argv: Sequence[str], env: dict[str, str], fds: tuple[int, ...] = ()) -> None:
        import subprocess

        self.role = role
        read_fd, write_fd = os.pipe()
        env = dict(env, **{_ROLE_ENV: role, _READY_ENV: str(write_fd)})
        self.proc = subprocess.Popen([sys.executable, "-m", "batched_fn.examples.server", *argv],
                                     env=env, pass_fds=(write_fd, *fds))
        os.close(write_fd)
        self.ready_fd = read_fd

    def wait_ready(self, deadline: float) -> bool:
        import select
        import time

        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.ready_fd], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if readable:
                ok = os.read(self.ready_fd, 1) == b"1"
                os.close(self.ready_fd)
                return ok
        return False



def _stop_all(children: Sequence[_Child], timeout: float, kill: bool = False) -> None:
    """SIGTERM (SIGKILL with kill) every child at once; SIGKILL those still running after timeout seconds."""
    import subprocess
    import time

    for child in children:
        if child.proc.poll() is None:
            child.proc.kill() if kill else child.proc.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("%s process %d did not stop within %.0fs: killed", child.role, child.proc.pid, timeout)
            child.proc.kill()
            child.proc.wait()


def _supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    """--workers > 1: start the model process (unless --no-share) and the HTTP workers; stop them on a signal."""
    import signal
    import time

    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    sock = _listen(config)
    port = sock.getsockname()[1]
    name = f"batched_fn-server-{port}-{os.getpid()}"
    env = dict(os.environ)
    model: _Child | None = None
    workers: list[_Child] = []
    ready = False
    try:
        if not config.no_share:
            env[_SHARED_ENV] = name
            model = _Child("model", argv, env)
        env[_LISTEN_ENV] = str(sock.fileno())
        workers = [_Child("http", argv, env, (sock.fileno(),)) for _ in range(config.workers)]
        deadline = time.monotonic() + MODEL_LOAD_SECONDS
        for child in ([model] if model else []) + workers:
            if not child.wait_ready(deadline):
                log.error("the %s process %d did not start", child.role, child.proc.pid)
                return 1
        sock.close()   # the workers hold it
        ready = True
        print(f"batched_fn server ready on http://{config.host}:{port} (model={config.model}, "
              f"max_batch_size={config.max_batch_size}, workers={config.workers}, "
              f"{'a model each' if config.no_share else 'one shared model'})", flush=True)
        while not stopping and any(w.proc.poll() is None for w in workers):
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        sock.close()
        # the workers first (they answer every accepted request within --timeout
        # + a few seconds), then the model process they were calling; a server
        # that never became ready has no request to answer: killed at once
        _stop_all(workers, config.timeout + 5, kill=not ready)
        if model is not None:
            _stop_all([model], CLOSE_JOIN_SECONDS + 5, kill=not ready)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the knobs and serve until SIGINT/SIGTERM, then answer every request and exit 0.

    The exit comes within ``--timeout`` + a few seconds however long the running batch is.
    """
    import socket

    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper())
    role = os.environ.get(_ROLE_ENV)
    if role == "model":
        _model_process(config, os.environ[_SHARED_ENV])
        return
    if role == "http":
        parent = os.getppid()
        _watch_parent(parent)
        sock = socket.socket(fileno=int(os.environ[_LISTEN_ENV]))
        app = create_app(config, os.environ.get(_SHARED_ENV))
        app.state.port = sock.getsockname()[1]
        app.state.on_ready = _signal_ready
        if not _serve(config, app, sock):
            sys.exit(1)
        return
    if config.workers > 1:
        sys.exit(_supervise(config, argv))
    app = create_app(config)
    sock = _listen(config)
    app.state.port = sock.getsockname()[1]
    if not _serve(config, app, sock):
        sys.exit(1)


if __name__ == "__main__":
    main()
