"""The server's knobs: :class:`ServerConfig`, read from defaults, ``BATCHED_FN_*`` variables and flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

from .. import models

__all__ = ["ServerConfig", "parse_config", "ENV_PREFIX", "PROG", "PRIORITY_RANGE", "HTTP_SERVERS"]

ENV_PREFIX = "BATCHED_FN_"
PROG = "python -m batched_fn.examples.server"

#: the ``priority`` a request body may ask for (both ends included); higher is served first
PRIORITY_RANGE = (-(1 << 31), (1 << 31) - 1)   # a C int, as batched_fn takes it
#: what --http takes: the threaded mode's HTTP server
HTTP_SERVERS = ("uvicorn", "granian")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every knob of the example server; see ``--help`` for what each one does.

    ``model_threads`` are the batcher's worker threads in the process that
    holds the model (each with its own copy); ``workers`` are HTTP worker
    processes; ``threads`` are HTTP worker threads of one process (the
    threaded mode, free-threaded Python only).
    """

    model: str = "minilm"
    max_batch_size: int = 32
    max_delay: float | str = "auto"
    channel_cap: int | None = 256
    model_threads: int = 1
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
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    gc_freeze: bool = True
    gc_threshold: int = 50_000
    switch_interval: float = 0.0005
    loop_lag_factor: float = 4.0
    no_share: bool = False
    length_buckets: bool = False
    threads: int = 1
    http: str = "uvicorn"

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


_flag.__name__ = "on/off"


# (field, type, help): each becomes --field-name and BATCHED_FN_FIELD_NAME
_KNOBS: Sequence[tuple[str, Callable[[str], Any], str]] = (
    ("model", str, f"model to serve: one of {sorted(models.MODELS)}"),
    ("max_batch_size", int, "most inputs per batch (1 = one request at a time)"),
    ("max_delay", _delay, "seconds a batch waits for more inputs after its first one, or auto "
                          "(adapts to the model's speed and the arrivals)"),
    ("channel_cap", _cap, "most requests queued before 503 (none = unbounded)"),
    ("model_threads", int, "batcher worker threads in the model's process, each with its own copy of the model"),
    ("timeout", float, "default (and largest) seconds a request may wait for its answer before 504"),
    ("max_text_chars", int, "longest text accepted (longer: 413)"),
    ("host", str, "address to bind"),
    ("port", int, "port to bind (0 = any free port)"),
    ("log_level", str, "uvicorn log level"),
    ("torch_threads", int, "minilm: torch intra-op threads (0 = torch's default)"),
    ("toy_dim", int, "toy model: embedding size"),
    ("toy_batch_ms", float, "toy model: milliseconds of work per batch"),
    ("toy_item_ms", float, "toy model: milliseconds of work per input"),
    ("workers", int, "HTTP worker processes; more than 1: they share one model process"),
    ("threads", int, "HTTP worker threads of one process over one in-process batcher (more than 1, or "
                     "--http granian: needs a free-threaded CPython with the GIL off; not with --workers > 1)"),
    ("http", str, "HTTP server of the threaded mode: uvicorn (one event loop and server per thread) or granian"),
    ("header_timeout", float, "seconds a connection may take to send a request's headers (then 408 and closed)"),
    ("body_timeout", float, "seconds a request may take to send its body once its headers came (then 408)"),
    ("gc_freeze", _flag, "gc.freeze() after the model is loaded and warmed up (off: leave the GC alone)"),
    ("gc_threshold", int, "the collector's first threshold once started (tracked objects allocated and not "
                          "freed between young passes; 0 = Python's 700)"),
    ("loop_lag_factor", float, "seconds of a request's timeout that each second of event-loop lag takes off (its "
                               "wait to be read and to be answered); 503 at once when nothing is left; 0 = off"),
    ("switch_interval", float, "seconds a thread may hold the GIL while another waits for it "
                               "(sys.setswitchinterval, in every server process)"),
)


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Read the knobs: defaults, then ``BATCHED_FN_*`` environment variables, then flags."""
    env = os.environ if env is None else env
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog=PROG, description="Sentence-embedding server with dynamic batching.")
    for name, kind, help_text in _KNOBS:
        env_name = ENV_PREFIX + name.upper()
        default = getattr(defaults, name)
        if env_name in env:
            try:
                default = kind(env[env_name])
            except ValueError:
                parser.error(f"invalid {env_name} value: {env[env_name]!r}")
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                            metavar="on|off" if kind is _flag else None,
                            help=f"{help_text} [env {env_name}, default {default!r}]")
    _add_switch(parser, env, "no_share", "with --workers > 1: each worker loads its own model instead of sharing one")
    _add_switch(parser, env, "length_buckets",
                "batch texts of similar length together (batch_key=models.length_key(model): token counts for "
                "minilm, characters for toy, in powers of two), so a batch pads little")
    args = parser.parse_args(argv)
    config = ServerConfig(**vars(args))
    _check(parser, config)
    return config


def _add_switch(parser: argparse.ArgumentParser, env: Mapping[str, str], name: str, help_text: str) -> None:
    """An on/off flag ``--name`` (store_true) whose default comes from ``BATCHED_FN_NAME``."""
    env_name = ENV_PREFIX + name.upper()
    try:
        default = _flag(env.get(env_name, ""))
    except ValueError:
        parser.error(f"invalid {env_name} value: {env[env_name]!r}")
    parser.add_argument("--" + name.replace("_", "-"), action="store_true", default=default,
                        help=f"{help_text} [env {env_name}=1]")


def _check(parser: argparse.ArgumentParser, config: ServerConfig) -> None:
    """Exit through parser.error naming the first knob out of range."""
    if config.model not in models.MODELS:
        parser.error(f"invalid model value: expected one of {sorted(models.MODELS)} (got {config.model!r})")
    for name in ("timeout", "header_timeout", "body_timeout"):
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            parser.error(f"invalid {name} value: expected seconds > 0 (got {value!r})")
    if not (config.loop_lag_factor >= 0 and math.isfinite(config.loop_lag_factor)):
        parser.error(f"invalid loop_lag_factor value: expected a number >= 0 (got {config.loop_lag_factor!r})")
    if not (0 < config.switch_interval <= 1):
        parser.error(f"invalid switch_interval value: expected seconds in (0, 1] (got {config.switch_interval!r})")
    if config.gc_threshold < 0:
        parser.error(f"invalid gc_threshold value: expected >= 0 (got {config.gc_threshold!r})")
    if config.http not in HTTP_SERVERS:
        parser.error(f"invalid http value: expected one of {list(HTTP_SERVERS)} (got {config.http!r})")
    for name in ("workers", "threads", "model_threads", "max_batch_size", "max_text_chars"):
        if getattr(config, name) < 1:
            parser.error(f"invalid {name} value: expected >= 1 (got {getattr(config, name)!r})")
    if config.threads > 1 and config.workers > 1:
        parser.error(f"--threads {config.threads} and --workers {config.workers} do not mix: threads share one "
                     "process's batcher, workers are processes; choose one")
