"""Bounded request reading: a connection that never finishes its headers or its body is answered 408 and closed.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but
not the time a request takes to arrive: a client that sends half its headers,
or a Content-Length and then part of the body, holds its connection (and the
request's task) forever.  :func:`bounded_protocol` wraps uvicorn's HTTP
protocol class with one timer per connection: ``header_timeout`` seconds from
the first byte of a request (or from the connection) to the end of its
headers, then ``body_timeout`` seconds to the end of its body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from .lag import overloaded_message

__all__ = ["bounded_protocol", "http_protocol_class"]

log = logging.getLogger("batched_fn.examples.server")

_HEADERS, _BODY = "headers", "body"


def _timeout_response(phase: str, seconds: float) -> bytes:
    body = json.dumps({"error": f"request {phase} not received within {seconds:g}s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _BoundedRead:
    """Mixed in before one of uvicorn's protocol classes: one read timer per connection (see the module)."""

    header_timeout = 10.0
    body_timeout = 30.0
    _read_timer: asyncio.TimerHandle | None = None
    _read_phase: str | None = None
    # set by uvicorn's protocol classes
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: Any

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._watch(_HEADERS)          # a connection that sends nothing is a request never started

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._watch(_HEADERS)     # these bytes start a request whose headers are not complete
        elif cycle.more_body:
            self._watch(_BODY)
        else:
            self._watch(None)          # the whole request is here

    def on_response_complete(self) -> None:
        self._watch(None)              # uvicorn's keep-alive timer takes over
        super().on_response_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch(None)
        super().connection_lost(exc)  # type: ignore[misc]

    def _watch(self, phase: str | None) -> None:
        if phase == self._read_phase:
            return                     # the same phase keeps its deadline: a total, not an idle time
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._read_phase = phase
        if phase is not None:
            seconds = self.header_timeout if phase == _HEADERS else self.body_timeout
            self._read_timer = self.loop.call_later(seconds, self._read_too_slow, phase, seconds)

    def _read_too_slow(self, phase: str, seconds: float) -> None:
        self._read_timer = None
        self._read_phase = None
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if phase == _HEADERS or not cycle.response_started:
            transport.write(_timeout_response(phase, seconds))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True          # its answer, if any comes, is not written
            cycle.message_event.set()          # a body read in progress sees the disconnect
        transport.close()


def _overloaded_response(lag: float) -> bytes:
    body = json.dumps({"error": overloaded_message(lag)}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Answered:
    """The ``cycle`` a connection keeps after a request answered by :class:`_ShedWhenBehind`: complete."""

    response_complete = True
    response_started = True
    more_body = False
    disconnected = False


_ANSWERED = _Answered()


class _ShedWhenBehind:
    """Mixed in before uvicorn's httptools protocol: ``POST /embed`` gets 503 before any app code runs
    while the event loop runs too far behind for it to be answered in time (see ``lag``).

    The same rule as ``embed_response``'s (the lag times its factor against ``--timeout``), taken where it costs
    least: once the headers are parsed, without a request cycle, a task or the ASGI app; the body is
    parsed and dropped, and the connection is kept.  Only for a request that is next in line on its
    connection (never ahead of a pipelined request still being answered).
    """

    lag: Any = None                   # the app's LoopLag
    lag_timeout = 10.0                # --timeout
    cycle: Any
    parser: Any
    transport: Any
    url: bytes

    def on_headers_complete(self) -> None:
        lag = self.lag
        if (lag is not None and (self.cycle is None or self.cycle.response_complete)
                and self.parser.get_method() == b"POST" and self.url.split(b"?", 1)[0] == b"/embed"):
            if lag.behind() >= self.lag_timeout:
                lag.count_shed()
                self.transport.write(_overloaded_response(lag.seconds()))
                self.cycle = _ANSWERED
                if not self.parser.should_keep_alive():
                    self.transport.close()
                    return
                self.on_response_complete()   # type: ignore[attr-defined]
                return
        super().on_headers_complete()  # type: ignore[misc]


def bounded_protocol(base: type, header_timeout: float, body_timeout: float) -> type:
    """A subclass of uvicorn's protocol class base that bounds how long a request takes to arrive.

    Uses what both of uvicorn's HTTP/1.1 protocols (httptools and h11) keep:
    ``cycle`` (the request being answered; None before the first) with its
    ``more_body`` and ``response_complete``/``response_started`` flags, and
    ``on_response_complete``.
    """
    return type(f"Bounded{base.__name__}", (_BoundedRead, base),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})


def http_protocol_class(header_timeout: float, body_timeout: float, lag: Any = None,
                        timeout: float = 10.0) -> type:
    """uvicorn's default HTTP protocol (httptools if installed, else h11), bounded as above.

    With lag (a LoopLag) and httptools, also shedding ``POST /embed`` while the loop runs behind
    (:class:`_ShedWhenBehind`, against timeout seconds); with h11 the app sheds alone.
    """
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        base = HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        base = H11Protocol
    bounded = bounded_protocol(base, header_timeout, body_timeout)
    if lag is None or base.__name__ != "HttpToolsProtocol":
        return bounded
    return type(f"Shedding{bounded.__name__}", (_ShedWhenBehind, bounded), {"lag": lag, "lag_timeout": timeout})
