"""A sentence-embedding HTTP service with dynamic batching (FastAPI + uvicorn).

Run it::

    python -m batched_fn.examples.server --port 8000            # all-MiniLM-L6-v2, offline
    python -m batched_fn.examples.server --model toy --port 8000  # tiny stand-in, no torch

Endpoints:

- ``POST /embed`` with ``{"text": "...", "timeout": 2.5, "priority": 1}``
  (timeout and priority optional) returns ``{"embedding": [...]}``.
- ``GET /stats``: the batcher's :class:`batched_fn.Stats` as JSON, plus the
  knobs, this process's recent latency by part (``latency``) and its garbage
  collector's passes (``gc``; with ``--workers``, ``model_gc`` too).
- ``GET /healthz``: 200 while the batcher is healthy, else 503.
- ``GET /metrics``: Prometheus metrics (with ``prometheus_client`` installed).

Errors, as ``{"error": "..."}``: 503 + ``Retry-After`` when the queue is full
(from ``Full.retry_after``), the server is closing or the model is
unavailable; 504 when a request was not answered within its timeout; 422 for
a body that is not JSON (or nested too deeply), not an object, or lacks a
string ``text`` that UTF-8 can encode, or has a bad ``timeout`` or
``priority``; 413 for an oversized body or text; 408 for a request whose
headers or body did not arrive within ``--header-timeout`` /
``--body-timeout``; 500 when the model failed on that request's input.

``--workers N`` (N > 1) runs N HTTP worker processes on one listening socket
and ONE model process: it loads the model once and shares its batcher
(``BatchedFn.share``); every worker ``connect()``s to it, so one batch holds
requests from all workers, and /stats and /metrics in any worker report that
one batcher.  ``--no-share`` gives each worker its own model instead.  The
process started is a supervisor: it restarts a child that dies (with
back-off; it gives up and exits 1 after repeated deaths), forwards SIGTERM to
the workers, stops the model process after them, and exits 0.

SIGINT/SIGTERM: the server stops accepting, answers requests still sending
their body with 503 at once, gives requests waiting for the model up to
``--timeout`` seconds (then 503), and exits 0 within ``--timeout`` + 10
seconds, however long the running batch takes.

Every knob is a flag and an environment variable (``--max-batch-size`` /
``BATCHED_FN_MAX_BATCH_SIZE``, ...); flags win.  See ``--help``.

The package, by job: ``config`` (the knobs), ``app`` (the command line and
the FastAPI app), ``answer`` (answering one request), ``backend`` (the model
in this process or shared by the model process, and the control channel),
``reading`` (bounded request reading), ``timing`` (where a request's time
goes), ``lag`` (how far behind the event loop runs), ``supervisor`` (``--workers N``).
"""

from __future__ import annotations

from .answer import InFlight, embed_response
from .timing import GcPauses, Timings
from .app import EmbedApp, build_app, create_app, main
from .backend import LocalBackend, SharedBackend, build_batcher
from .config import ServerConfig, parse_config
from .lag import LoopLag

__all__ = ["ServerConfig", "InFlight", "Timings", "LocalBackend", "SharedBackend", "parse_config",
           "build_batcher", "build_app", "embed_response", "create_app", "main", "GcPauses", "EmbedApp", "LoopLag"]
