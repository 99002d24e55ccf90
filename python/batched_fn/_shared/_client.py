"""The caller's side: :func:`connect` to a function shared by another process.

One non-blocking socket per connection.  Callers queue their request records
in an :class:`~._wire.Outbox`; whoever finds no write in progress writes
everything queued as one frame, as far as the socket takes it (asyncio
callers of one loop iteration are written together, from a ``call_soon``);
the rest waits in a send queue that the connection's I/O thread writes when
the socket is writable, so no caller, and no event loop, ever blocks on a
send.  The I/O thread also reads the replies and wakes the callers (asyncio
callers of one frame with one ``call_soon_threadsafe`` per loop), and fails
calls whose ``timeout`` passed without a reply, whatever the model process
does.  When the model process goes away the socket reads EOF, and every
waiting and later call fails with ``Closed``.

The I/O thread refers to the connection's state, not to the :class:`RemoteFn`:
a RemoteFn dropped without ``close()`` is collected, and its connection
closes then.

Thread safety (no GIL assumed): a connection's ``lock`` guards its request
ids, pending waiters, deadlines, scheduled loops and error; ``send_lock`` its
send queue, the write-in-progress flag and the order of writes; the outbox
has its own lock (_wire.py); ``wake_lock`` guards the wake pipe against its
closing; ``_LIVE`` is changed under ``_LIVE_LOCK``; a blocking caller's slot
is handed over by its own lock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import pickle
import selectors
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

from .._batchcore import wrapped_error
from .._config import check_priority, check_timeout
from ..errors import BatchedFnError, Closed, Full
from . import _wire as w
from ._names import check_name, clean_stale, peer_uid, runtime_dir, socket_path

__all__ = ["connect", "RemoteFn", "RemoteError", "RemoteTraceback"]

log = logging.getLogger("batched_fn")

#: how often connect() looks for the name while it does not exist yet (seconds)
_CONNECT_POLL = 0.01
#: a call with timeout= fails with TimeoutError this long after its timeout when
#: no reply came (the model process's own TimeoutError normally comes first)
TIMEOUT_GRACE = 0.1
#: bytes waiting to be sent beyond which acall/submit raise Full and blocking calls wait
MAX_SEND_BACKLOG = 64 << 20
#: RemoteFn.healthy waits this long for the model process to answer (seconds)
HEALTH_TIMEOUT = 1.0
_LIVE: "weakref.WeakSet[_Connection]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _call_opts(timeout: float | None, priority: int) -> dict[str, Any] | None:
    """A CALL record's options: only those not at their default (None: none)."""
    if timeout is None and not priority:
        return None
    opts: dict[str, Any] = {}
    if timeout is not None:
        opts["timeout"] = float(timeout)
    if priority:
        opts["priority"] = priority
    return opts


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


# ---------------------------------------------------------------- waiters: where a reply goes

class _Blocking:
    """A blocking caller: a lock released when its reply is in."""

    __slots__ = ("lock", "ok", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.ok = False
        self.value: Any = None

    def deliver(self, ok: bool, value: Any, by_loop: dict[Any, list[Any]]) -> None:
        self.ok, self.value = ok, value
        self.lock.release()


class _FutureWaiter:
    """A :meth:`RemoteFn.submit` caller: a concurrent future.

    It holds the RemoteFn: one whose only reference is gone is kept open
    until its submitted calls are answered (``connect(n).submit(x)`` works).
    """

    __slots__ = ("fut", "remote")

    def __init__(self, fut: "Future[Any]", remote: "RemoteFn") -> None:
        self.fut = fut
        self.remote = remote

    def deliver(self, ok: bool, value: Any, by_loop: dict[Any, list[Any]]) -> None:
        try:
            if ok:
                self.fut.set_result(value)
            else:
                self.fut.set_exception(value)
        except Exception:   # cancelled by its caller in between
            pass


class _AsyncWaiter:
    """An :meth:`RemoteFn.acall` caller: a future of its event loop (woken once per frame per loop)."""

    __slots__ = ("loop", "fut")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: "asyncio.Future[Any]") -> None:
        self.loop = loop
        self.fut = fut

    def deliver(self, ok: bool, value: Any, by_loop: dict[Any, list[Any]]) -> None:
        by_loop.setdefault(self.loop, []).append((self.fut, ok, value))


def _wake_loops(by_loop: dict[Any, list[Any]]) -> None:
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_async, items)
        except RuntimeError:   # that loop is closed: nobody awaits these
            pass


def _resolve_async(items: list[Any]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, (StopIteration, StopAsyncIteration)):
            # asyncio refuses these on a future: hand them over wrapped, as in-process
            fut.set_exception(wrapped_error(value))
        else:
            fut.set_exception(value)


# ---------------------------------------------------------------- connect

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
    directory = runtime_dir()
    path = socket_path(directory, name)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0 if deadline is None else max(0.05, min(5.0, deadline - time.monotonic())))
            sock.connect(path)
            if peer_uid(sock) != os.getuid():
                raise PermissionError(f"the process sharing {name!r} belongs to another user")
            reader = w.FrameReader()
            hello = _read_hello(sock, reader)
            sock.setblocking(False)
            return RemoteFn(_Connection(name, sock, reader, hello))
        except ConnectionRefusedError:
            sock.close()   # a dead owner's file: remove it, wait for a new owner
            clean_stale(directory, name)
        except (FileNotFoundError, EOFError, ConnectionResetError, BlockingIOError, socket.timeout):
            sock.close()   # not there yet, or its backlog is full
        except BaseException:
            sock.close()
            raise
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no process shared {name!r} within {timeout}s")
        time.sleep(_CONNECT_POLL)


def _read_hello(sock: socket.socket, reader: w.FrameReader) -> dict[str, Any]:
    while True:
        frames = reader.read(sock)
        if frames:
            record = frames[0][0][0]
            if type(record) is not tuple or record[0] != w.HELLO or record[1] != w.VERSION:
                raise ConnectionError(f"unexpected greeting from the model process (protocol {w.VERSION} "
                                      f"expected): {record!r}")
            return dict(record[2])


# ---------------------------------------------------------------- the connection

class _Connection:
    """One connection's state and I/O thread (which never refers to the RemoteFn)."""

    def __init__(self, name: str, sock: socket.socket, reader: w.FrameReader, hello: dict[str, Any]) -> None:
        self.name = name
        self.max_item_bytes: int = hello["max_item_bytes"]
        self.max_frame_bytes: int = hello["max_frame_bytes"]
        self.owner_pid: int = hello["pid"]
        self.sock = sock
        self.reader = reader
        self.ids = itertools.count(1)
        self.lock = threading.Lock()   # guards ids, pending, error, scheduled, deadlines
        self.pending: dict[int, Any] = {}   # request id -> waiter
        self.deadlines: list[tuple[float, int]] = []   # heap of (deadline, id) of submit/acall calls
        self.scheduled: set[asyncio.AbstractEventLoop] = set()   # loops with a flush scheduled
        self.error: str | None = None   # why calls fail with Closed, once closed
        self.outbox = w.Outbox()
        self.send_lock = threading.Lock()   # guards sendq, waiting_write and the order of writes
        self.sendq = w.SendQueue()
        self.waiting_write = False      # the I/O thread writes the send queue when the socket takes more
        self.room = threading.Condition(self.send_lock)   # blocking callers waiting for the backlog to drain
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_lock = threading.Lock()   # guards wake_w against its closing
        self.thread = threading.Thread(target=self._run, name=f"batched_fn-connect-{name}", daemon=True)
        self.thread.start()
        with _LIVE_LOCK:
            _LIVE.add(self)

    # ------------------------------------------------------------ requests (caller threads)

    def encode(self, value: Any) -> tuple[Any, tuple[int, ...] | None, list[memoryview], int]:
        """(payload, buffer lengths or None, buffers, size) of value; raises ValueError/TypeError."""
        kind = type(value)
        if kind in w.PLAIN:
            size = w.plain_size(value)
            if size <= self.max_item_bytes:
                return value, None, [], size   # travels in the record itself
        try:
            payload, buffers = w.dumps_payload(value)
        except Exception as exc:
            raise TypeError(f"input of type {kind.__qualname__} cannot be pickled: "
                            f"{type(exc).__name__}: {exc}") from exc
        size = len(payload)
        for b in buffers:
            size += b.nbytes
        if size > self.max_item_bytes:
            raise ValueError(f"input of {size} bytes exceeds max_item_bytes={self.max_item_bytes} "
                             f"of shared function {self.name!r}")
        return payload, tuple(b.nbytes for b in buffers), buffers, size

    def queue(self, waiter: Any, value: Any, timeout: float | None, loop: asyncio.AbstractEventLoop | None,
              op: int = w.CALL, priority: int = 0) -> int:
        """Queue a request; write it now (threads) or this loop iteration (asyncio).

        priority (a CALL): sent in its opts when not 0.

        Raises Closed, Full (asyncio and futures, when too much waits to be
        sent), ValueError or TypeError (the input).
        """
        if op == w.CALL:
            payload, lengths, buffers, size = self.encode(value)
        if self.sendq.nbytes > MAX_SEND_BACKLOG and not self._wait_backlog(waiter, timeout):
            raise Full(f"{self.sendq.nbytes} bytes wait to be sent to shared function {self.name!r}")
        opts = _call_opts(timeout, priority) if op == w.CALL else None
        with self.lock:
            if self.error is not None:
                raise Closed(self.error)
            # under the lock: itertools.count is not atomic without a GIL, and two
            # requests with one id would get each other's replies
            rid = next(self.ids)
            if op == w.CALL:
                record: Any = (w.CALL, rid, payload, lengths, opts)
            else:
                record, buffers, size = (op, rid), [], 16
            self.pending[rid] = waiter
            if timeout is not None and not isinstance(waiter, _Blocking):
                deadline = time.monotonic() + timeout + TIMEOUT_GRACE
                heapq.heappush(self.deadlines, (deadline, rid))
                earliest = self.deadlines[0][1] == rid
            else:
                earliest = False
            self.outbox.put(record, buffers, size)
            if loop is not None:
                if loop in self.scheduled:
                    loop = None
                    first = False
                else:
                    self.scheduled.add(loop)
                    first = True
        if earliest:
            self.wake()   # the I/O thread sleeps until the earliest deadline
        if loop is not None:
            if first:
                loop.call_soon(self.flush_soon, loop)
        elif not isinstance(waiter, _AsyncWaiter):
            self.flush()
        return rid

    def _wait_backlog(self, waiter: Any, timeout: float | None) -> bool:
        """Too much waits to be sent: a blocking caller waits (True once below the limit)."""
        if not isinstance(waiter, _Blocking):
            return False
        with self.room:
            return self.room.wait_for(lambda: self.sendq.nbytes <= MAX_SEND_BACKLOG or self.error is not None,
                                      timeout)

    def cancel(self, rid: int) -> None:
        """The caller gave up: forget it, and withdraw it in the model process."""
        with self.lock:
            if self.pending.pop(rid, None) is None or self.error is not None:
                return
            self.outbox.put((w.CANCEL, rid), None, 16)
        self.flush()

    def flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            self.scheduled.discard(loop)
        self.flush()

    def flush(self) -> None:
        """Write what is queued as far as the socket takes it now; never blocks."""
        with self.send_lock:
            if not self.outbox:
                return
            records, buffers, _ = self.outbox.take()
            for frame in self._frames(records, buffers):
                self.sendq.extend(frame)
            if self.waiting_write:
                return
            try:
                if self.sendq.send(self.sock):
                    return
            except OSError:
                return   # the I/O thread sees the socket fail
            self.waiting_write = True
        self.wake()

    def _frames(self, records: list[Any], buffers: list[memoryview]) -> list[list[Any]]:
        """records cut into frames of at most the model process's frame limit."""
        limit = self.max_frame_bytes - (64 << 10)   # room for the meta's own bytes
        frames: list[list[Any]] = []
        start = size = b0 = b = 0
        for i, rec in enumerate(records):
            n = 64
            nbuf = 0
            if rec[0] == w.CALL:
                lengths = rec[3]
                n += len(rec[2]) if lengths is not None else w.plain_size(rec[2])
                if lengths:
                    nbuf = len(lengths)
                    n += sum(lengths)
            if size + n > limit and i > start:
                frames.append(w.encode_frame(records[start:i], buffers[b0:b]))
                start, size, b0 = i, 0, b
            size += n
            b += nbuf
        frames.append(w.encode_frame(records[start:], buffers[b0:]))
        return frames

    def wake(self) -> None:
        with self.wake_lock:
            if self.wake_w >= 0:
                try:
                    os.write(self.wake_w, b"x")
                except OSError:
                    pass

    # ------------------------------------------------------------ the I/O thread

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sock = self.sock
        why = f"the model process of shared function {self.name!r} closed the connection"
        try:
            sel.register(sock, selectors.EVENT_READ)
            sel.register(self.wake_r, selectors.EVENT_READ)
            watching_write = False
            while self.error is None:
                timeout = None
                if self.deadlines:
                    timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
                for key, events in sel.select(timeout):
                    if key.fileobj is not sock:
                        self._drain_wake()
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._write_backlog()
                    bye = self._read_replies() if events & selectors.EVENT_READ else None
                    if bye is not None:
                        why = f"the model process of shared function {self.name!r} closed the connection: {bye}"
                        raise EOFError
                want = self.waiting_write
                if want != watching_write:
                    sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0))
                    watching_write = want
                if self.deadlines:
                    self._expire()
        except (EOFError, OSError, w.ProtocolError):
            pass
        except BaseException:
            log.exception("batched_fn: the connection to shared function %r failed", self.name)
        finally:
            sel.close()
            self.fail_all(why)
            with self.send_lock:
                self.sendq.clear()
                self.room.notify_all()
                try:
                    sock.close()
                except OSError:
                    pass
            with self.wake_lock:   # a closed descriptor's number may be reused: never write to it
                os.close(self.wake_r)
                os.close(self.wake_w)
                self.wake_r = self.wake_w = -1

    def _read_replies(self) -> Any:
        """Read and dispatch what the socket holds; the model process's BYE reason, if it sent one."""
        try:
            frames = self.reader.read(self.sock)
        except (BlockingIOError, InterruptedError):
            return None
        for records, data in frames:
            bye = self._dispatch(records, data)
            if bye is not None:
                return bye
        return None

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _write_backlog(self) -> None:
        with self.send_lock:
            done = self.sendq.send(self.sock)   # OSError: the connection failed
            if done:
                self.waiting_write = False
                if self.outbox:   # queued while we wrote: write it now
                    records, buffers, _ = self.outbox.take()
                    for frame in self._frames(records, buffers):
                        self.sendq.extend(frame)
                    self.waiting_write = not self.sendq.send(self.sock)
            if self.sendq.nbytes <= MAX_SEND_BACKLOG:
                self.room.notify_all()

    def _expire(self) -> None:
        """Fail the calls whose timeout passed with no reply (TimeoutError), and withdraw them."""
        now = time.monotonic()
        late = []
        with self.lock:
            while self.deadlines and self.deadlines[0][0] <= now:
                _, rid = heapq.heappop(self.deadlines)
                waiter = self.pending.pop(rid, None)
                if waiter is not None:
                    late.append(waiter)
                    self.outbox.put((w.CANCEL, rid), None, 16)
        if not late:
            return
        self.flush()
        by_loop: dict[Any, list[Any]] = {}
        for waiter in late:
            waiter.deliver(False, self.timeout_error(), by_loop)
        _wake_loops(by_loop)

    def timeout_error(self) -> TimeoutError:
        return TimeoutError(f"no reply from shared function {self.name!r} within the call's timeout")

    def _dispatch(self, records: list[Any], data: memoryview) -> str | None:
        """Hand each reply to its waiter; the BYE message if the model process said goodbye."""
        offset = 0
        by_loop: dict[Any, list[Any]] = {}
        pending = self.pending
        bye = None
        for rec in records:
            op = rec[0]
            if op == w.RESULT:
                waiter = pending.pop(rec[1], None)
                if rec[3] is None:   # a plain value
                    if waiter is not None:
                        waiter.deliver(True, rec[2], by_loop)
                    continue
                buffers, offset = w.split_buffers(data, rec[3], offset)
                if waiter is None:
                    continue
                try:
                    ok, value = True, pickle.loads(rec[2], buffers=buffers)
                except Exception as exc:
                    ok, value = False, BatchedFnError(f"output could not be unpickled: {type(exc).__name__}: {exc}")
            elif op == w.ERROR:
                waiter = pending.pop(rec[1], None)
                if waiter is None:
                    continue
                ok, value = False, _decode_error(rec)
            elif op == w.BYE:
                bye = str(rec[1])
                continue
            else:
                continue
            waiter.deliver(ok, value, by_loop)
        _wake_loops(by_loop)
        return bye

    def fail_all(self, why: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = why
            why = self.error
            pending, self.pending = self.pending, {}
            self.deadlines.clear()
        by_loop: dict[Any, list[Any]] = {}
        for waiter in pending.values():
            waiter.deliver(False, Closed(why), by_loop)
        _wake_loops(by_loop)

    def close(self, join: bool = True) -> None:
        """Close the connection: its waiting calls fail with Closed.  Idempotent."""
        with self.lock:
            if self.error is None:
                self.error = f"connection to shared function {self.name!r} was closed"
        self.wake()
        if join and threading.current_thread() is not self.thread:
            self.thread.join(5.0)

    def after_fork(self) -> None:
        # The connection belongs to the parent: a child connects again itself.
        self.error = f"connection to {self.name!r} belongs to the parent process: connect() again"
        self.pending = {}
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:   # -1: closed already by the parent's I/O thread (the number may be reused)
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.wake_r = self.wake_w = -1
        self.sock.close()


class RemoteFn:
    """A connection to a shared BatchedFn; call it like the BatchedFn itself.

    ``f(x)``, ``await f.acall(x)`` and ``f.submit(x)`` behave as in the
    model process (batching, timeouts, Full, Closed, the handler's
    exception).  ``timeout=`` is also kept here: a call gets TimeoutError
    at most :data:`TIMEOUT_GRACE` after its timeout whatever the model
    process does.  :meth:`close` closes this process's connection only;
    a RemoteFn dropped without it closes when collected.
    """

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._finalizer = weakref.finalize(self, conn.close, False)

    @property
    def name(self) -> str:
        """The shared name this connects to."""
        return self._conn.name

    @property
    def max_item_bytes(self) -> int:
        """The model process's limit on one input's pickled size."""
        return self._conn.max_item_bytes

    @property
    def owner_pid(self) -> int:
        """The process id of the model process."""
        return self._conn.owner_pid

    def __call__(self, value: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """Run value through the shared function; block until its output.

        timeout bounds the whole wait (queued and in a batch) and priority
        orders it among every process's calls, as in the model process.
        Raises Full, Closed, TimeoutError, ValueError (input over
        max_item_bytes), TypeError (input cannot be pickled) or the
        handler's exception.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        if priority.__class__ is not int or priority:
            priority = check_priority(priority)
        conn = self._conn
        waiter = _Blocking()
        rid = conn.queue(waiter, value, timeout, None, priority=priority)
        try:
            if timeout is None:
                waiter.lock.acquire()
            elif not waiter.lock.acquire(timeout=timeout + TIMEOUT_GRACE):
                with conn.lock:
                    late = conn.pending.pop(rid, None) is not None
                if late:
                    conn.outbox.put((w.CANCEL, rid), None, 16)
                    conn.flush()
                    raise conn.timeout_error()
                waiter.lock.acquire()   # the reply is being handed over
        except BaseException:   # Ctrl-C while waiting: withdraw it
            conn.cancel(rid)
            raise
        if waiter.ok:
            return waiter.value
        # The exception's traceback will hold this frame: neither waiter nor a
        # local may hold the exception then, or each failed call leaves a cycle.
        error, waiter.value = waiter.value, None
        try:
            raise error
        finally:
            del error

    async def acall(self, value: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """``await`` the output for value; never blocks the event loop.

        timeout and priority as for ``__call__``.  Cancelling the task
        withdraws the request.  Raises like ``__call__``, and Full when more
        than 64 MiB wait to be sent.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        if priority.__class__ is not int or priority:
            priority = check_priority(priority)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rid = self._conn.queue(_AsyncWaiter(loop, fut), value, timeout, loop, priority=priority)
        try:
            return await fut
        except asyncio.CancelledError:
            self._conn.cancel(rid)
            raise
        finally:
            # a failed call's traceback holds this frame, fut its exception: no cycle
            del fut

    def submit(self, value: Any, *, timeout: float | None = None, priority: int = 0) -> "Future[Any]":
        """Queue value; return a :class:`concurrent.futures.Future` of its output.

        timeout and priority as for ``__call__``.  Closed, Full and a bad
        timeout or priority are raised here, at once; an input that is too
        large or cannot be pickled fails the future.  Cancelling the future
        withdraws it.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        if priority.__class__ is not int or priority:
            priority = check_priority(priority)
        fut: Future[Any] = Future()
        conn = self._conn
        try:
            rid = conn.queue(_FutureWaiter(fut, self), value, timeout, None, priority=priority)
        except (ValueError, TypeError) as exc:
            fut.set_exception(exc)
            return fut
        fut.add_done_callback(lambda f: conn.cancel(rid) if f.cancelled() else None)
        return fut

    def stats(self, timeout: float = 5.0) -> Any:
        """The model process's ``stats()`` (every process's calls), asked over the connection.

        Raises Closed, or TimeoutError when the model process does not answer within timeout.
        """
        return self._ask(timeout)[0]

    @property
    def healthy(self) -> bool:
        """True while connected and the model process answers (within 1 s) that its function is healthy.

        For a health check: False when the connection is closed, the model
        process does not answer in time (stopped, overloaded) or its workers failed.
        """
        try:
            return bool(self._ask(HEALTH_TIMEOUT)[1])
        except (Closed, TimeoutError, OSError):
            return False

    def _ask(self, timeout: float) -> tuple[Any, bool]:
        conn = self._conn
        waiter = _Blocking()
        rid = conn.queue(waiter, None, None, None, op=w.STATS)
        if not waiter.lock.acquire(timeout=timeout):
            with conn.lock:
                late = conn.pending.pop(rid, None) is not None
            if late:
                raise TimeoutError(f"shared function {self.name!r} did not answer within {timeout}s")
            waiter.lock.acquire()
        if not waiter.ok:
            raise waiter.value
        return waiter.value

    @property
    def closed(self) -> bool:
        """True once this connection is closed (locally or by the model process)."""
        return self._conn.error is not None

    def close(self) -> None:
        """Close this process's connection; its waiting calls fail with Closed.  Idempotent."""
        self._conn.close()

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


def _break_all_after_fork() -> None:
    # after a fork: this process has one thread
    for conn in list(_LIVE):
        conn.after_fork()


os.register_at_fork(after_in_child=_break_all_after_fork)
