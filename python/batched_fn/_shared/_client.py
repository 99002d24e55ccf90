"""The caller's side: :func:`connect` to a function shared by another process.

One socket per connection.  Callers queue their request records; whichever
caller finds no write in progress writes everything queued in one frame
(asyncio callers of one loop iteration are written together, from a
``call_soon``).  A reader thread takes the replies and wakes the callers
(asyncio callers of one frame with one ``call_soon_threadsafe`` per loop).
When the model process goes away the socket reads EOF, and every waiting
and later call fails with ``Closed``.

Thread safety (no GIL assumed): a RemoteFn's ``_lock`` guards its ids,
pending waiters, outgoing records and flags; ``_LIVE`` is changed under
``_LIVE_LOCK``; a blocking caller's slot is handed over by its own lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

from .._config import check_timeout
from ..errors import BatchedFnError, Closed
from . import _wire as w
from ._names import check_name, runtime_dir, socket_path
from ._owner import peer_uid

__all__ = ["connect", "RemoteFn", "RemoteError", "RemoteTraceback"]

log = logging.getLogger("batched_fn")

_SLOT, _FUTURE, _ASYNC = 0, 1, 2
#: how often connect() looks for the name while it does not exist yet (seconds)
_CONNECT_POLL = 0.01
_LIVE: "weakref.WeakSet[RemoteFn]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class RemoteError(BatchedFnError):
    """The handler's exception, when its type cannot be rebuilt in this process.

    Attributes:
        type_name: the exception's ``module.qualname`` in the model process.
        remote_traceback: its traceback there, as text.
    """

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # keep the attributes through pickling
        return (type(self), (self.args[0] if self.args else "", self.type_name, self.remote_traceback))


class RemoteTraceback(Exception):
    """The ``__cause__`` of a rebuilt handler exception: its traceback in the model process."""

    def __str__(self) -> str:
        return "\n" + (self.args[0] if self.args else "")


class _Slot:
    """What a blocking caller waits on: a lock released when the reply is in."""

    __slots__ = ("lock", "ok", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.ok = False
        self.value: Any = None


def connect(name: str, timeout: float | None = 30.0) -> "RemoteFn":
    """Connect to the function another process of this user shares under name.

    Waits up to timeout seconds (None: forever) for the name to appear.

    Raises:
        TypeError, ValueError: name or timeout is invalid.
        TimeoutError: no live process shared name within timeout.
        PermissionError: the name's directory is not private to this user.
    """
    check_name(name)
    if timeout is not None:
        timeout = check_timeout(timeout)
    path = socket_path(runtime_dir(), name)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0 if deadline is None else max(0.05, min(5.0, deadline - time.monotonic())))
            sock.connect(path)
            if peer_uid(sock) != os.getuid():
                raise PermissionError(f"the process sharing {name!r} belongs to another user")
            hello = _read_hello(sock)
            sock.settimeout(None)
            return RemoteFn(name, sock, hello[2], hello[3])
        except (FileNotFoundError, ConnectionRefusedError, EOFError, ConnectionResetError, socket.timeout):
            sock.close()   # not there yet, or a dead owner's file: wait for a new owner
        except BaseException:
            sock.close()
            raise
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no process shared {name!r} within {timeout}s")
        time.sleep(_CONNECT_POLL)


def _read_hello(sock: socket.socket) -> tuple[Any, ...]:
    reader = w.FrameReader()
    while True:
        frames = reader.read(sock)
        if frames:
            record = frames[0][0][0]
            if record[0] != w.HELLO or record[1] != w.VERSION:
                raise ConnectionError(f"unexpected greeting from the model process: {record!r}")
            return tuple(record)


class RemoteFn:
    """A connection to a shared BatchedFn; call it like the BatchedFn itself.

    ``f(x)``, ``await f.acall(x)`` and ``f.submit(x)`` behave as in the
    model process (batching, timeouts, Full, Closed, the handler's
    exception).  :meth:`close` closes this process's connection only.
    """

    def __init__(self, name: str, sock: socket.socket, max_item_bytes: int, owner_pid: int) -> None:
        self.name = name
        self.max_item_bytes = max_item_bytes
        self.owner_pid = owner_pid
        self._sock = sock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()   # guards _pending, _out, _out_buffers, _writing, _scheduled, _error
        self._pending: dict[int, tuple[Any, ...]] = {}   # request id -> waiter
        self._out: list[Any] = []        # records not written yet
        self._out_buffers: list[memoryview] = []
        self._writing = False            # a caller is writing; it also writes what others queue
        self._scheduled: set[asyncio.AbstractEventLoop] = set()   # loops with a flush scheduled
        self._error: str | None = None   # why calls fail with Closed, once closed
        self._reader = threading.Thread(target=self._read_loop, name=f"batched_fn-connect-{name}", daemon=True)
        self._reader.start()
        with _LIVE_LOCK:
            _LIVE.add(self)

    # ------------------------------------------------------------ calls

    def _encode(self, value: Any) -> tuple[Any, list[memoryview] | None]:
        kind = type(value)
        if kind in w.PLAIN and (kind is not str and kind is not bytes or len(value) * 4 < self.max_item_bytes):
            return value, None   # travels in the record itself
        try:
            payload, buffers = w.dumps_payload(value)
        except Exception as exc:
            raise TypeError(f"input of type {type(value).__qualname__} cannot be pickled: "
                            f"{type(exc).__name__}: {exc}") from exc
        size = len(payload)
        for b in buffers:
            size += b.nbytes
        if size > self.max_item_bytes:
            raise ValueError(f"input of {size} bytes exceeds max_item_bytes={self.max_item_bytes} "
                             f"of shared function {self.name!r}")
        return payload, buffers

    def _queue(self, waiter: tuple[Any, ...], value: Any, timeout: float | None,
               loop: asyncio.AbstractEventLoop | None) -> int:
        """Queue a request; write it now (threads) or this loop iteration (asyncio)."""
        payload, buffers = self._encode(value)
        sizes = None if buffers is None else tuple(b.nbytes for b in buffers)
        with self._lock:
            if self._error is not None:
                raise Closed(self._error)
            # under the lock: itertools.count is not atomic without a GIL, and two
            # requests with one id would get each other's replies
            rid = next(self._ids)
            record = (w.CALL, rid, timeout, payload, sizes)
            self._pending[rid] = waiter
            self._out.append(record)
            if buffers:
                self._out_buffers.extend(buffers)
            if self._writing:
                return rid
            if loop is not None:
                if loop in self._scheduled:
                    return rid
                self._scheduled.add(loop)
            else:
                self._writing = True
        if loop is not None:
            loop.call_soon(self._flush_soon, loop)
        else:
            self._write_out()
        return rid

    def _cancel(self, rid: int) -> None:
        """The caller gave up: forget it, and withdraw it in the model process."""
        with self._lock:
            if self._pending.pop(rid, None) is None or self._error is not None:
                return
            self._out.append((w.CANCEL, rid))
            if self._writing:
                return
            self._writing = True
        self._write_out()

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._scheduled.discard(loop)
            if self._writing or not self._out:
                return
            self._writing = True
        self._write_out()

    def _write_out(self) -> None:
        """Write everything queued, until nothing is; the caller set _writing."""
        while True:
            with self._lock:
                records, buffers = self._out, self._out_buffers
                if not records:
                    self._writing = False
                    return
                self._out, self._out_buffers = [], []
            try:
                w.send_all(self._sock, w.encode_frame(records, buffers))
            except OSError:
                with self._lock:
                    self._writing = False
                self._fail_all(f"the model process of shared function {self.name!r} went away")
                return

    def __call__(self, value: Any, *, timeout: float | None = None) -> Any:
        """Run value through the shared function; block until its output.

        Raises Full, Closed, TimeoutError, ValueError (input over
        max_item_bytes), TypeError (input cannot be pickled) or the
        handler's exception.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        slot = _Slot()
        rid = self._queue((_SLOT, slot), value, timeout, None)
        try:
            slot.lock.acquire()
        except BaseException:   # Ctrl-C while waiting: withdraw it
            self._cancel(rid)
            raise
        if slot.ok:
            return slot.value
        raise slot.value

    async def acall(self, value: Any, *, timeout: float | None = None) -> Any:
        """``await`` the output for value; never blocks the event loop.

        Cancelling the task withdraws the request.  Raises like ``__call__``.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rid = self._queue((_ASYNC, loop, fut), value, timeout, loop)
        try:
            return await fut
        except asyncio.CancelledError:
            self._cancel(rid)
            raise

    def submit(self, value: Any, *, timeout: float | None = None) -> "Future[Any]":
        """Queue value; return a :class:`concurrent.futures.Future` of its output.

        Closed is raised here, at once; an input that is too large or cannot
        be pickled fails the future.  Cancelling the future withdraws it.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        fut: Future[Any] = Future()
        try:
            rid = self._queue((_FUTURE, fut), value, timeout, None)
        except (ValueError, TypeError) as exc:
            fut.set_exception(exc)
            return fut
        fut.add_done_callback(lambda f: self._cancel(rid) if f.cancelled() else None)
        return fut

    # ------------------------------------------------------------ replies

    def _read_loop(self) -> None:
        reader = w.FrameReader()
        sock = self._sock
        try:
            while True:
                for records, data in reader.read(sock):
                    self._dispatch(records, data)
        except (EOFError, OSError):
            pass
        except BaseException:
            log.exception("batched_fn: the reader of shared function %r failed", self.name)
        self._fail_all(f"the model process of shared function {self.name!r} closed the connection")

    def _dispatch(self, records: list[Any], data: memoryview) -> None:
        offset = 0
        by_loop: dict[Any, list[Any]] = {}
        pending = self._pending
        for rec in records:
            if rec[0] == w.RESULT:
                waiter = pending.pop(rec[1], None)
                if rec[3] is None:   # a plain value
                    if waiter is not None:
                        _resolve(waiter, True, rec[2], by_loop)
                    continue
                buffers, offset = w.split_buffers(data, rec[3], offset)
                if waiter is None:
                    continue
                try:
                    ok, value = True, pickle.loads(rec[2], buffers=buffers)
                except Exception as exc:
                    ok, value = False, BatchedFnError(
                        f"output could not be unpickled: {type(exc).__name__}: {exc}")
            elif rec[0] == w.ERROR:
                waiter = pending.pop(rec[1], None)
                if waiter is None:
                    continue
                ok, value = False, _decode_error(rec)
            else:
                continue
            _resolve(waiter, ok, value, by_loop)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_async, items)
            except RuntimeError:   # that loop is closed: nobody awaits these
                pass

    def _fail_all(self, why: str) -> None:
        with self._lock:
            if self._error is None:
                self._error = why
            why = self._error
            pending, self._pending = self._pending, {}
        by_loop: dict[Any, list[Any]] = {}
        for waiter in pending.values():
            _resolve(waiter, False, Closed(why), by_loop)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_async, items)
            except RuntimeError:
                pass

    # ------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        """True once this connection is closed (locally or by the model process)."""
        return self._error is not None

    def close(self) -> None:
        """Close this process's connection; its waiting calls fail with Closed.  Idempotent."""
        with self._lock:
            if self._error is None:
                self._error = f"connection to shared function {self.name!r} was closed"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(5.0)
        self._sock.close()

    def __enter__(self) -> "RemoteFn":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected"
        return f"<RemoteFn {self.name!r} {state} owner_pid={self.owner_pid}>"


def _decode_error(rec: Any) -> BaseException:
    _, _, pickled, type_name, message, tb = rec
    exc: Any = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(f"{type_name}: {message}", type_name, tb)
    if tb and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


def _resolve(waiter: tuple[Any, ...], ok: bool, value: Any, by_loop: dict[Any, list[Any]]) -> None:
    kind = waiter[0]
    if kind == _SLOT:
        slot = waiter[1]
        slot.ok, slot.value = ok, value
        slot.lock.release()
    elif kind == _ASYNC:
        by_loop.setdefault(waiter[1], []).append((waiter[2], ok, value))
    else:
        fut = waiter[1]
        try:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        except Exception:   # cancelled by its caller in between
            pass


def _resolve_async(items: list[Any]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, (StopIteration, StopAsyncIteration)):
            # asyncio refuses these on a future: hand them over wrapped, as in-process
            err = BatchedFnError(f"handler raised {type(value).__name__}")
            err.__cause__ = value
            fut.set_exception(err)
        else:
            fut.set_exception(value)


def _break_all_after_fork() -> None:
    # The connections belong to the parent: a child connects again itself.
    for remote in list(_LIVE):   # after a fork: this process has one thread
        remote._error = f"connection to {remote.name!r} belongs to the parent process: connect() again"
        remote._pending = {}
        remote._sock.close()


os.register_at_fork(after_in_child=_break_all_after_fork)
