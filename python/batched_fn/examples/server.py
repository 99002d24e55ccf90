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

Errors, as ``{"error": "..."}``: 503 + ``Retry-After`` when the queue is full
(or the server is closing), 504 when a request was not taken into a batch
within its timeout, 422 for a body that is not JSON or lacks a string
``text``, 413 for an oversized body or text, 500 when the model raised.

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
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from batched_fn import BatchedFn, Closed, Full, batched_fn

from . import models

__all__ = ["ServerConfig", "parse_config", "build_batcher", "embed_response", "create_app", "main"]

log = logging.getLogger("batched_fn.examples.server")

ENV_PREFIX = "BATCHED_FN_"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every knob of the example server; see ``--help`` for what each one does."""

    model: str = "minilm"
    max_batch_size: int = 32
    max_delay: float = 0.005
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

    @property
    def max_body_bytes(self) -> int:
        """The largest body read: the text limit in escaped JSON (\\uXXXX = 6 bytes), plus room."""
        return self.max_text_chars * 6 + 4096


def _cap(value: str) -> int | None:
    if value.strip().lower() in ("none", "unbounded", "0"):
        return None
    return int(value)


# (field, type, help): each becomes --field-name and BATCHED_FN_FIELD_NAME
_KNOBS: Sequence[tuple[str, Callable[[str], Any], str]] = (
    ("model", str, f"model to serve: one of {sorted(models.MODELS)}"),
    ("max_batch_size", int, "most inputs per batch (1 = one request at a time)"),
    ("max_delay", float, "seconds a batch waits for more inputs after its first one"),
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
    args = parser.parse_args(argv)
    config = ServerConfig(**vars(args))
    if config.model not in models.MODELS:
        parser.error(f"invalid model value: expected one of {sorted(models.MODELS)} (got {config.model!r})")
    if not (config.timeout > 0 and math.isfinite(config.timeout)):
        parser.error(f"invalid timeout value: expected seconds > 0 (got {config.timeout!r})")
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
        return model.embed(texts)

    return batched_fn(embed, max_batch_size=config.max_batch_size, max_delay=config.max_delay,
                      channel_cap=config.channel_cap, num_workers=config.num_workers,
                      context={"model": load_model})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _read_request(body: bytes, config: ServerConfig) -> tuple[str, float] | Any:
    """The text and timeout of an /embed body, or the error response."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
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
    timeout = payload.get("timeout", config.timeout)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout <= 0):
        return _error(422, f"field 'timeout' must be a number of seconds > 0 (got {timeout!r})")
    return text, min(float(timeout), config.timeout)


async def embed_response(fn: BatchedFn[str, list[float]], config: ServerConfig, request: Any) -> Response:
    """Answer one ``POST /embed`` (a Starlette request) through fn; every error is a status.

    Shared by the FastAPI app and the Ray Serve deployment.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
        return _error(413, f"body has {length} bytes; the limit is {config.max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():      # a chunked body has no Content-Length: count as it comes
        size += len(chunk)
        if size > config.max_body_bytes:
            return _error(413, f"body has more than {config.max_body_bytes} bytes; the limit is "
                               f"{config.max_body_bytes}")
        chunks.append(chunk)
    body = b"".join(chunks)
    parsed = _read_request(body, config)
    if not isinstance(parsed, tuple):
        return parsed
    text, timeout = parsed
    try:
        vector = await fn.acall(text, timeout=timeout)
    except Full as exc:
        retry = max(1, math.ceil(exc.retry_after))
        return _error(503, f"server busy: {exc.queued} requests queued; retry in {retry}s",
                      {"Retry-After": str(retry)})
    except TimeoutError:
        return _error(504, f"request was not taken into a batch within {timeout}s")
    except Closed:
        return _error(503, "server is shutting down", {"Retry-After": "1"})
    except Exception as exc:  # the model failed on this batch
        log.exception("model failed")
        return _error(500, f"model failed: {type(exc).__name__}")
    return Response(json.dumps({"embedding": vector}), media_type="application/json")


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app: a batcher started at startup (the model loads then), closed at shutdown."""
    fn = build_batcher(config)
    registry = None
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from batched_fn.prometheus import register

        registry = CollectorRegistry()
        register(fn, "embed", registry=registry)
    except ImportError:  # the [prometheus] extra is optional
        generate_latest = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(fn.start)        # loads the model in each worker
        await fn.acall("warm up")                 # the first forward pass is the slowest
        print(f"batched_fn server ready on http://{config.host}:{app.state.port} "
              f"(model={config.model}, max_batch_size={config.max_batch_size})", flush=True)
        try:
            yield
        finally:
            await asyncio.to_thread(fn.close)

    app = FastAPI(title="batched_fn embedding server", lifespan=lifespan)
    app.state.batcher = fn
    app.state.config = config
    app.state.port = config.port

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        """Embed one text; it is batched with concurrent requests."""
        return await embed_response(fn, config, request)

    @app.get("/stats")
    async def stats() -> Any:
        """The batcher's counters (batched_fn.Stats) and the server's knobs."""
        data = dataclasses.asdict(fn.stats())
        data["batches_by_reason"] = dict(data["batches_by_reason"])
        data["config"] = dataclasses.asdict(config)
        return data

    @app.get("/healthz")
    async def healthz() -> Any:
        """200 while every worker runs and calls are accepted (BatchedFn.healthy)."""
        if fn.healthy:
            return {"status": "ok"}
        return _error(503, "unhealthy: the batcher is closed or a worker failed")

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus exposition of the batcher's metrics (prefix ``embed_``)."""
        if registry is None or generate_latest is None:
            return _error(404, "prometheus_client is not installed: pip install 'batched_fn[prometheus]'")
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the knobs and serve until SIGINT/SIGTERM (then finish queued requests and exit)."""
    import signal
    import socket

    import uvicorn

    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper())
    app = create_app(config)
    # bind here so --port 0 works and the ready line names the real port
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    app.state.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, access_log=False,
                                           timeout_graceful_shutdown=config.timeout + 5))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal
    # to the handlers it found: make those no-ops so a graceful stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        sys.exit(1)


if __name__ == "__main__":
    main()
