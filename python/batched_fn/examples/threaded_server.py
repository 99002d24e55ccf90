"""The embedding server with its HTTP workers as threads of one process (free-threaded Python).

Run it on a free-threaded CPython (3.13t or later, GIL off)::

    python3.13t -m batched_fn.examples.threaded_server --threads 4 --port 8000 [server flags]

Every flag of ``batched_fn.examples.server`` applies (``--model``,
``--max-batch-size``, ``--timeout``, ...; ``--workers`` must stay 1).  The
process builds ONE batched function (one model), then serves HTTP from
``--threads`` threads, each running its own asyncio event loop: with
``--http uvicorn`` (the default) a uvicorn server per thread on the same
listening socket; with ``--http granian``, granian's worker threads (its HTTP
front end is in Rust; granian runs its workers as threads on a free-threaded
build) over one app.  Every request is answered by the thread that accepted
it, calling the batched function in-process: no pickling and no socket
between the HTTP front and the model, unlike ``--workers N``.  The endpoints
and their answers are the example server's (``POST /embed``, ``GET /stats``,
``/healthz``, ``/metrics``), computed by the same code.

On a build with a GIL (or with ``PYTHON_GIL=1``) the threads would take turns
on one core, so it refuses to start and says why (exit status 2).

SIGINT/SIGTERM: every thread's server stops accepting and answers what it
holds as the example server does (``--timeout`` seconds of grace), then the
batched function is closed and the process exits 0.

Thread safety: the batched function is shared by every thread (the core is
free-threading safe); with uvicorn each thread has its own event loop, app,
``InFlight`` and uvicorn server; with granian its threads share one app, which
keeps no per-request state of its own; the Prometheus registry is read-only
after start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import sysconfig
import threading
from typing import Any, AsyncIterator, Sequence

from .ready import ready_line

__all__ = ["free_threading_problem", "create_thread_app", "serve_threads", "serve_granian", "main"]

log = logging.getLogger("batched_fn.examples.threaded_server")

# What this module takes from the example server are its public names (InFlight, parse_config,
# build_batcher, embed_response); the few helpers below are its own.
CLOSE_JOIN_SECONDS = 2.0    # how long a running batch is waited for at exit (as the example server)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _metrics_registry(fn: Any) -> Any:
    """A Prometheus registry exporting fn (prefix ``embed_``), or None without prometheus_client."""
    try:
        from prometheus_client import CollectorRegistry

        from batched_fn.prometheus import register
    except ImportError:
        return None
    registry = CollectorRegistry()
    register(fn, "embed", registry=registry)
    return registry


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)   # before the ready line: a client that connects at once is queued
    return sock


def free_threading_problem() -> str | None:
    """Why threads of this interpreter cannot run in parallel, or None when they can."""
    if not sysconfig.get_config_var("Py_GIL_DISABLED"):
        return (f"--threads needs a free-threaded CPython (3.13t or later); this is a regular build "
                f"({sys.version.split()[0]}), whose GIL lets one thread run at a time: use --workers N "
                "(processes) instead")
    if getattr(sys, "_is_gil_enabled", lambda: True)():
        return ("--threads needs the GIL off, but it is on (PYTHON_GIL=1 or -X gil=1, or a module "
                "imported without free-threading support re-enabled it)")
    return None


def create_thread_app(fn: Any, config: Any, registry: Any = None, *, shared: bool = False) -> Any:
    """An app over the shared batched function fn (started and closed by the caller).

    One per uvicorn thread; with shared (granian: one app for all its worker
    threads) requests are not tracked for a graceful stop (granian stops its
    workers itself), so no set is written by every thread on every request.
    ``POST /embed`` is answered without Starlette's router, as in the example server.
    """
    from fastapi import FastAPI
    from fastapi.responses import Response

    from . import server as S

    inflight = S.InFlight()
    lag = S.LoopLag(config.loop_lag_factor) if config.loop_lag_factor else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="batched_fn embedding server (threads)", lifespan=lifespan)
    app.state.batcher = fn
    app.state.config = config
    app.state.inflight = inflight

    @app.get("/stats")
    async def stats() -> Any:
        """The shared batcher's counters and the knobs."""
        data = dataclasses.asdict(fn.stats())
        data["batches_by_reason"] = dict(data["batches_by_reason"])
        data["config"] = dataclasses.asdict(config)
        data["pid"] = os.getpid()
        data["thread"] = threading.current_thread().name   # the HTTP thread that answered
        data["loop"] = None if lag is None else lag.summary()
        return data

    @app.get("/healthz")
    async def healthz() -> Any:
        """200 while every worker runs and calls are accepted, else 503."""
        if inflight.closing:
            return _error(503, "server is shutting down", {"Retry-After": "1"})
        if fn.healthy:
            return {"status": "ok"}
        return _error(503, "unhealthy: the batcher is closed or a model worker failed")

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus exposition of the shared batcher's metrics (prefix ``embed_``)."""
        if registry is None:
            return _error(404, "prometheus_client is not installed: pip install 'batched_fn[prometheus]'")
        from prometheus_client import generate_latest

        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    # POST /embed: the request is batched with concurrent requests of every thread
    return S.EmbedApp(app, fn, config, None if shared else inflight, None, lag)


class _HttpThread(threading.Thread):
    """One HTTP worker: an event loop and a uvicorn server on a duplicate of the listening socket."""

    def __init__(self, index: int, app: Any, config: Any, sock: socket.socket) -> None:
        super().__init__(name=f"batched_fn-http-{index}", daemon=True)
        import uvicorn

        inflight = app.state.inflight

        class Server(uvicorn.Server):
            async def shutdown(self, sockets: list[Any] | None = None) -> None:
                inflight.begin_shutdown(grace=config.timeout)
                await super().shutdown(sockets)

        self.server = Server(uvicorn.Config(app, log_level=config.log_level, access_log=False,
                                            timeout_graceful_shutdown=math.ceil(config.timeout) + 2))
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # not the main thread: uvicorn installs no signal handlers here
            self.server.run(sockets=[self.sock])
        except BaseException as exc:   # reported by serve_threads
            self.error = exc
        finally:
            self.sock.close()


def _serve_until_stopped(workers: list[Any], stop: threading.Event, config: Any, port: int, threads: int) -> bool:
    """Wait for every HTTP thread to start, say so, then until a signal or a thread ends; False if one never started."""
    while not all(w.server.started for w in workers):
        if any(not w.is_alive() for w in workers) or stop.wait(0.01):
            break
    if not all(w.server.started for w in workers):
        return False
    print(ready_line("batched_fn server", f"http://{config.host}:{port}",
                     f"(model={config.model}, max_batch_size={config.max_batch_size}, {threads} HTTP threads, "
                     "GIL off)"), flush=True)
    while not stop.wait(0.2) and all(w.is_alive() for w in workers):
        pass
    return True


def serve_threads(config: Any, threads: int, sock: socket.socket) -> int:
    """Serve on sock with `threads` HTTP threads sharing one batched function; return the exit status."""
    from . import server as S

    fn = S.build_batcher(config)
    try:
        fn.start()                       # loads (and warms up) the model once
    except Exception as exc:
        print(f"model failed to load: {exc!r}", file=sys.stderr)
        return 1
    registry = _metrics_registry(fn)
    workers = [_HttpThread(i, create_thread_app(fn, config, registry), config, sock) for i in range(threads)]
    problem = free_threading_problem()   # a module imported since (the model's, uvicorn's) may have turned it on
    if problem is not None:
        print(f"batched_fn threaded server: {problem}", file=sys.stderr)
        fn.close(CLOSE_JOIN_SECONDS)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for w in workers:
        w.start()
    ok = _serve_until_stopped(workers, stop, config, sock.getsockname()[1], threads)
    for w in workers:
        w.server.should_exit = True      # polled by each server's loop: its graceful shutdown begins
    for w in workers:
        w.join(config.timeout + 5)
    sock.close()
    fn.close(CLOSE_JOIN_SECONDS)
    for w in workers:
        if w.error is not None:
            log.error("HTTP thread %s failed: %r", w.name, w.error)
            ok = False
    return 0 if ok else 1


# --http granian: granian imports the app by name (factory=True: it calls this once, in the
# main thread, and every worker thread serves the one app it returns)
_GRANIAN_SETUP: dict[str, Any] = {}


def _granian_app() -> Any:
    """The app granian serves (one for all its worker threads), over the shared batched function."""
    return create_thread_app(_GRANIAN_SETUP["fn"], _GRANIAN_SETUP["config"], _GRANIAN_SETUP["registry"],
                             shared=True)


def serve_granian(config: Any, threads: int) -> int:
    """Serve with granian's worker threads over one app and one batched function; return the exit status."""
    import granian

    # Any: granian takes these options as strings; its stubs want its enum types
    Granian: Any = granian.Granian

    from . import server as S

    fn = S.build_batcher(config)
    try:
        fn.start()
    except Exception as exc:
        print(f"model failed to load: {exc!r}", file=sys.stderr)
        return 1
    _GRANIAN_SETUP.update(fn=fn, config=config, registry=_metrics_registry(fn))
    problem = free_threading_problem()
    if problem is not None:
        print(f"batched_fn threaded server: {problem}", file=sys.stderr)
        fn.close(CLOSE_JOIN_SECONDS)
        return 2
    print(f"batched_fn server ready on http://{config.host}:{config.port} (model={config.model}, "
          f"max_batch_size={config.max_batch_size}, {threads} HTTP threads (granian), GIL off)", flush=True)
    try:
        Granian(f"{__name__}:_granian_app", address=config.host, port=config.port, interface="asgi",
                workers=threads, runtime_threads=1, loop="asyncio", http="1", websockets=False,
                factory=True, log_level=config.log_level if config.log_level != "warning" else "warn",
                workers_kill_timeout=math.ceil(config.timeout) + 2).serve()
    finally:
        fn.close(CLOSE_JOIN_SECONDS)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """``--threads N`` plus every flag of the example server; refuses to start on a GIL build."""
    from . import server as S

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BATCHED_FN_THREADS", "4")))
    parser.add_argument("--http", choices=("uvicorn", "granian"), default=os.environ.get("BATCHED_FN_HTTP", "uvicorn"))
    known, rest = parser.parse_known_args(argv)
    if known.threads < 1:
        raise SystemExit(f"invalid --threads value: expected an int >= 1 (got {known.threads})")
    problem = free_threading_problem()
    if problem is not None:
        print(f"batched_fn threaded server: {problem}", file=sys.stderr)
        raise SystemExit(2)
    config = dataclasses.replace(S.parse_config(rest), threads=known.threads, http=known.http)
    if config.workers != 1:
        raise SystemExit("--threads and --workers do not mix: threads share one process's batcher")
    logging.basicConfig(level=config.log_level.upper())
    if known.http == "granian":
        sys.exit(serve_granian(config, known.threads))
    sock = _listen(config.host, config.port)
    sys.exit(serve_threads(config, known.threads, sock))


if __name__ == "__main__":
    main()
