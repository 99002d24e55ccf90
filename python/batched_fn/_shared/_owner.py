"""The model process's side: export a BatchedFn under a name (``BatchedFn.share``).

One I/O thread accepts connections and reads requests; each request goes
into the BatchedFn through the one entry it declares for this
(``BatchedFn._remote_entry()``), so batching, ``channel_cap``, cost,
deadlines and ``stats()`` are the in-process ones.  A reply is encoded when
its request completes, usually in the worker thread while it delivers a
batch; the worker writes each connection's replies of the batch as one frame
when the batch is done (a batch listener); other replies (timeouts,
rejections) go out from the I/O thread.  Writes never block: what a socket
does not take is written by the I/O thread when the socket is writable.

Whatever one connection does (hangs up, sends garbage or an oversized
frame, stops reading) costs that connection alone: any exception while
handling it closes it with a log line, never the I/O thread.

Thread safety (no GIL assumed): ``Owner._mutex`` guards the dirty and
want-write sets and the wake flag; each connection's outbox has its own lock
(_wire.py) and its ``send_lock`` guards its send queue, ``waiting_write`` and
the order of its writes; its ``calls`` dict and the owner's ``_flushers`` set
and ``_room`` deque change by single operations (atomic on the object); the
connection table is the I/O thread's alone; ``_last_error`` is replaced in
one assignment; ``_OWNERS`` is changed under ``_OWNERS_LOCK``.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import selectors
import socket
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any

from .._config import DEFAULT_MAX_ITEM_BYTES, PRIORITY_MAX, PRIORITY_MIN
from ..errors import BatchedFnError, Closed, Full
from . import _wire as w
from ._names import check_name, clean_stale, peer_uid, remove_name, runtime_dir, socket_path, take_lock

__all__ = ["Owner", "share", "DEFAULT_MAX_ITEM_BYTES"]

log = logging.getLogger("batched_fn")

#: accept() failing for lack of descriptors or memory: wait this long first, doubling up to the max
_ACCEPT_BACKOFF = 0.05
_ACCEPT_BACKOFF_MAX = 1.0
#: calls waiting for room (on_full="block") are tried again at least this often (seconds)
_ROOM_POLL = 0.05
#: after close() from inside the handler, the longest the name stays to deliver what was queued
_DRAIN_SECONDS = 30.0
#: replies waiting for a client that does not read them: beyond this many bytes its calls are
#: not read any more until it catches up (a stalled reader costs memory only up to here)
MAX_REPLY_BACKLOG = 64 << 20
_OWNERS: "weakref.WeakSet[Owner]" = weakref.WeakSet()
_OWNERS_LOCK = threading.Lock()


def share(entry: Any, name: str, *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> "Owner":
    """Export a BatchedFn (its ``_remote_entry()``) under name to other processes of this user.

    Raises:
        TypeError, ValueError: name or max_item_bytes is invalid, or name is
            already shared by a live process.
    """
    check_name(name)
    if isinstance(max_item_bytes, bool) or not isinstance(max_item_bytes, int) or max_item_bytes < 1:
        raise ValueError(f"invalid max_item_bytes value: expected an int >= 1 (got {max_item_bytes!r})")
    return Owner(entry, name, max_item_bytes)


def _call_options(opts: Any) -> tuple[float | None, int]:
    """A call record's (timeout, priority) from its options dict (None: the defaults)."""
    if opts is None:
        return None, 0
    if type(opts) is not dict:
        raise w.ProtocolError(f"a call's options are a {type(opts).__name__}, not a dict")
    timeout = opts.get("timeout")
    if timeout is not None and (type(timeout) is not float or not timeout >= 0.0):
        raise w.ProtocolError(f"a call's timeout is {timeout!r}, not a float >= 0")
    priority = opts.get("priority", 0)
    if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise w.ProtocolError(f"a call's priority is {priority!r}, not an int in the C int range")
    return timeout, priority


def _encode_error(exc: BaseException) -> tuple[Any, ...]:
    """(pickled exception or None, type name, message, traceback text) of exc; never raises."""
    kind = type(exc)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except BaseException:   # a __str__ that raises, even SystemExit, must not lose the reply
        message = "(unprintable)"
    try:
        tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__)) if exc.__traceback__ else ""
    except BaseException:
        tb = ""
    try:
        pickled: bytes | None = pickle.dumps(exc, protocol=5)
    except BaseException:
        pickled = None
    return pickled, type_name, message, tb


class _Call:
    """One remote request in the model process; the core reports its outcome here.

    The core calls ``cancelled``, ``done``, ``set_result`` and ``set_exception``
    (the part of the concurrent Future interface it uses).
    """

    __slots__ = ("owner", "conn", "rid", "request", "withdrawn", "finished")

    def __init__(self, owner: "Owner", conn: "_Conn", rid: int) -> None:
        self.owner = owner
        self.conn = conn
        self.rid = rid
        self.request: Any = None   # the core's request, once queued
        self.withdrawn = False
        self.finished = False

    def cancelled(self) -> bool:
        return self.withdrawn

    def done(self) -> bool:
        return self.withdrawn or self.finished

    def set_result(self, value: Any) -> None:
        self.finished = True
        self.owner._on_result(self, value)

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True
        self.owner._on_error(self, exc)


class _RoomWait:
    """A call waiting for room in the queue (on_full="block"), in the I/O thread's FIFO."""

    __slots__ = ("conn", "rid", "value", "deadline", "priority")

    def __init__(self, conn: "_Conn", rid: int, value: Any, deadline: float | None, priority: int) -> None:
        self.conn = conn
        self.rid = rid
        self.value = value
        self.deadline = deadline
        self.priority = priority


class _Conn:
    """One connected client process."""

    __slots__ = ("sock", "fd", "reader", "calls", "outbox", "sendq", "send_lock", "dead", "waiting_write",
                 "paused", "__weakref__")

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = w.FrameReader(max_frame)
        self.calls: dict[int, Any] = {}        # request id -> _Call or _RoomWait (single dict ops only)
        self.outbox = w.Outbox()               # reply records not written yet
        self.send_lock = threading.Lock()      # guards sendq, waiting_write and the order of writes
        self.sendq = w.SendQueue()             # bytes the socket did not take yet
        self.waiting_write = False             # the I/O thread watches the socket for writability
        self.paused = False                    # not read while its replies back up (I/O thread)
        self.dead = False


class Owner:
    """Serves one BatchedFn to other processes under one name."""

    def __init__(self, entry: Any, name: str, max_item_bytes: int) -> None:
        self.entry = entry
        self.name = name
        self.max_item_bytes = max_item_bytes
        #: the largest frame a client may send (it cuts its writes to fit)
        self.max_frame_bytes = max(w.MAX_FRAME_BYTES, max_item_bytes + (1 << 20))
        self._dir = directory = runtime_dir()
        clean_stale(directory)   # names of owners that died: their files go
        self.path = socket_path(directory, name)
        lock_fd = take_lock(directory, name)
        if lock_fd is None:
            raise ValueError(f"name {name!r} is already shared by a live process")
        self._lock_fd = lock_fd
        # We hold the name: a socket file left here belongs to a dead owner.
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._listener.bind(self.path)   # inside the 0700 directory: nobody else sees it before the chmod
            os.chmod(self.path, 0o600)
            self._listener.listen(128)
            self._listener.setblocking(False)
            os.ftruncate(self._lock_fd, 0)
            os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        except BaseException:
            self._listener.close()
            remove_name(directory, name, self._lock_fd)   # give the name back
            raise

        self._hello = w.encode_frame([(w.HELLO, w.VERSION, {
            "max_item_bytes": max_item_bytes, "max_frame_bytes": self.max_frame_bytes, "pid": os.getpid()})], [])
        self._mutex = threading.Lock()           # guards _dirty, _wake_pending, _want_write
        self._dirty: set[_Conn] = set()          # conns with replies queued and no flush promised
        self._want_write: set[_Conn] = set()     # conns with a backlog for the I/O thread
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds_closed = False                 # set once the I/O thread closed the fds above
        self._flushers: set[int] = set()         # thread ids of workers (they flush after a batch)
        self._conns: dict[int, _Conn] = {}       # fd -> conn; the I/O thread's
        self._room: deque[_RoomWait] = deque()   # on_full="block": calls waiting for room, FIFO
        self._withdrawn = False                  # no new connections; closing
        self._drain_until: float | None = None   # closing from inside the handler: deliver, then go
        self._accept_paused_until = 0.0
        self._accept_backoff = _ACCEPT_BACKOFF
        # the last error encoded, with its encoding (one assignment: a racing
        # reader in another thread sees an old pair or the new one, never half)
        self._last_error: tuple[BaseException | None, tuple[Any, ...]] = (None, ())
        entry.add_batch_listener(self._after_batch)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"batched_fn-share-{name}", daemon=True)
        self._thread.start()
        with _OWNERS_LOCK:
            _OWNERS.add(self)

    @property
    def withdrawn(self) -> bool:
        """True once :meth:`withdraw` began (the function may be shared again, under any name)."""
        return self._withdrawn

    # ------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:   # a bug here must not leave clients waiting
            log.exception("batched_fn: the I/O thread of shared %r died", self.name)
        finally:
            self._teardown()

    def _loop(self) -> None:
        sel, listener, wake_r = self._sel, self._listener, self._wake_r
        while True:
            if self._withdrawn and self._drained():
                return
            self._flush_dirty()   # replies queued by this thread (rejections)
            timeout = self._next_timeout()
            for key, events in sel.select(timeout):
                obj = key.fileobj
                if obj is listener:
                    self._accept()
                elif obj == wake_r:
                    self._drain_wake()
                else:
                    self._serve_conn(key.data, events)
            if self._room:
                self._try_room()
            if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                if not self._withdrawn:
                    sel.register(listener, selectors.EVENT_READ, None)

    def _serve_conn(self, conn: _Conn, events: int) -> None:
        """One connection is ready: write its backlog, read its records; any error closes it alone."""
        try:
            if events & selectors.EVENT_WRITE:
                self._write_backlog(conn)
            if events & selectors.EVENT_READ and not conn.dead:
                if conn.sendq.nbytes > MAX_REPLY_BACKLOG:
                    conn.paused = True   # read it again once it takes its replies
                    self._update_events(conn)
                else:
                    self._read(conn)
        except Exception as exc:   # this connection only
            log.warning("batched_fn: shared %r: closing a connection after %s: %s",
                        self.name, type(exc).__name__, exc)
            self._drop(conn)

    def _next_timeout(self) -> float | None:
        timeout: float | None = None
        if self._room:
            timeout = _ROOM_POLL
        if self._accept_paused_until:
            wait = max(0.0, self._accept_paused_until - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        if self._drain_until is not None:
            timeout = _ROOM_POLL if timeout is None else min(timeout, _ROOM_POLL)
        return timeout

    def _drained(self) -> bool:
        """Closing: True once nothing is owed to any client (or the drain time is up)."""
        if self._drain_until is None or time.monotonic() >= self._drain_until:
            return True
        return not any(c.calls or c.outbox for c in self._conns.values())

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                self._pause_accept(exc)   # anything else: back off and try again, never die
                return
            self._accept_backoff = _ACCEPT_BACKOFF
            if self._withdrawn:   # closing: no new clients
                sock.close()
                continue
            try:
                self._greet(sock)
            except Exception as exc:   # hung up already: this connection only
                log.info("batched_fn: shared %r: a client left while connecting (%s: %s)",
                         self.name, type(exc).__name__, exc)
                sock.close()

    def _pause_accept(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a while (clients wait in the backlog)."""
        log.warning("batched_fn: shared %r: accept() failed (%s); trying again in %.2f s",
                    self.name, os.strerror(exc.errno or 0), self._accept_backoff)
        self._sel.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + self._accept_backoff
        self._accept_backoff = min(_ACCEPT_BACKOFF_MAX, self._accept_backoff * 2)

    def _greet(self, sock: socket.socket) -> None:
        if peer_uid(sock) != os.getuid():   # the 0700 directory should make this impossible
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock, self.max_frame_bytes)
        with conn.send_lock:
            conn.sendq.extend(self._hello)
            done = conn.sendq.send(sock)   # OSError: gone already, closed by the caller
        self._conns[conn.fd] = conn
        self._sel.register(sock, selectors.EVENT_READ if done else selectors.EVENT_READ | selectors.EVENT_WRITE,
                           conn)
        conn.waiting_write = not done

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._mutex:
            self._wake_pending = False
            want = list(self._want_write)
            self._want_write.clear()
        for conn in want:
            self._watch_write(conn)

    def _watch_write(self, conn: _Conn) -> None:
        self._update_events(conn)

    def _update_events(self, conn: _Conn) -> None:
        """Watch conn for what it needs now: reading unless paused, writing while a backlog waits."""
        if conn.dead:
            return
        events = (0 if conn.paused else selectors.EVENT_READ) | (selectors.EVENT_WRITE if conn.waiting_write else 0)
        self._sel.modify(conn.sock, events or selectors.EVENT_READ, conn)

    def _wake(self) -> None:
        """Ask the I/O thread to look at _dirty and _want_write (any thread)."""
        with self._mutex:
            if self._wake_pending or self._fds_closed:
                return
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _read(self, conn: _Conn) -> None:
        try:
            frames = conn.reader.read(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except (EOFError, ConnectionError):
            self._drop(conn)
            return
        except w.ProtocolError as exc:
            self._refuse(conn, str(exc))
            return
        try:
            for records, data in frames:
                offset = 0
                for rec in records:
                    if type(rec) is not tuple or not rec:
                        raise w.ProtocolError(f"a record is a {type(rec).__name__}, not a tuple")
                    op = rec[0]
                    if op == w.CALL:
                        offset = self._read_call(conn, rec, data, offset)
                    elif op == w.CANCEL:
                        self._cancel(conn, rec)
                    elif op == w.STATS:
                        self._answer_stats(conn, rec)
                    else:
                        raise w.ProtocolError(f"unknown record {op!r}")
        except w.ProtocolError as exc:
            self._refuse(conn, str(exc))
        except Exception as exc:   # a record of the wrong shape
            self._refuse(conn, f"malformed frame ({type(exc).__name__}: {exc})")

    def _refuse(self, conn: _Conn, why: str) -> None:
        """A protocol error: tell the client why (if it still reads), log it, close the connection."""
        log.warning("batched_fn: shared %r: closing a connection: %s", self.name, why)
        with conn.send_lock:
            conn.sendq.extend(w.encode_frame([(w.BYE, why)], []))
            try:
                conn.sendq.send(conn.sock)
            except OSError:
                pass
        self._drop(conn)

    def _read_call(self, conn: _Conn, rec: tuple, data: memoryview, offset: int) -> int:
        if len(rec) < 5:
            raise w.ProtocolError(f"a call record has {len(rec)} fields, not 5")
        _, rid, payload, lengths, opts = rec[:5]
        if type(rid) is not int:
            raise w.ProtocolError(f"a call's id is a {type(rid).__name__}, not an int")
        timeout, priority = _call_options(opts)
        if lengths is None:   # a plain value, in the record itself
            size = w.plain_size(payload)   # a bound; measured only when it is over the limit
            if size > self.max_item_bytes:
                size = len(pickle.dumps(payload, protocol=5))
            value = payload
        else:
            if type(payload) is not bytes or type(lengths) is not tuple:
                raise w.ProtocolError("a call's payload is not bytes with a tuple of buffer lengths")
            buffers, offset = w.split_buffers(data, lengths, offset)
            size = len(payload) + sum(lengths)
            if size <= self.max_item_bytes:
                try:
                    value = pickle.loads(payload, buffers=buffers)
                except Exception as exc:
                    self._reply_error(conn, rid, TypeError(
                        f"input could not be unpickled in the model process: {type(exc).__name__}: {exc}"))
                    return offset
        if size > self.max_item_bytes:
            self._reply_error(conn, rid, ValueError(
                f"input of {size} bytes exceeds max_item_bytes={self.max_item_bytes} "
                f"of shared function {self.name!r}"))
            return offset
        if self.entry.waits_for_room:   # the deadline counts from now, not from its turn
            self._room_call(conn, rid, value, timeout, priority)
        else:
            self._submit(conn, rid, value, timeout, priority)
        return offset

    def _cancel(self, conn: _Conn, rec: tuple) -> None:
        if len(rec) < 2 or type(rec[1]) is not int:
            raise w.ProtocolError(f"a cancel record {rec!r} has no int id")
        call = conn.calls.pop(rec[1], None)
        if call is None:
            return
        if isinstance(call, _RoomWait):
            return   # never queued: it just leaves the room FIFO (dropped there when its turn comes)
        call.withdrawn = True
        if call.request is not None:
            self.entry.cancel(call.request)

    def _answer_stats(self, conn: _Conn, rec: tuple) -> None:
        if len(rec) < 2 or type(rec[1]) is not int:
            raise w.ProtocolError(f"a stats record {rec!r} has no int id")
        payload, buffers = w.dumps_payload((self.entry.stats(), self.entry.healthy))
        self._queue_reply(conn, (w.RESULT, rec[1], payload, tuple(b.nbytes for b in buffers)), buffers)

    def _submit(self, conn: _Conn, rid: int, value: Any, timeout: float | None, priority: int = 0) -> bool:
        """Queue one call; False (nothing queued) when it must wait for room."""
        call = _Call(self, conn, rid)
        conn.calls[rid] = call
        try:
            call.request = self.entry.submit(value, call, timeout, priority)
        except Exception as exc:   # Full, Closed, a cost error: this call only
            conn.calls.pop(rid, None)
            if self.entry.waits_for_room and isinstance(exc, Full):
                return False
            self._reply_error(conn, rid, exc)
        return True

    def _room_call(self, conn: _Conn, rid: int, value: Any, timeout: float | None, priority: int) -> None:
        """on_full="block": queue now if there is room and nobody waits before it, else wait in the FIFO."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._room and self._submit(conn, rid, value, timeout, priority):
            return
        wait = _RoomWait(conn, rid, value, deadline, priority)
        conn.calls[rid] = wait
        self._room.append(wait)

    def _try_room(self) -> None:
        """Queue the calls waiting for room, in order, while there is room; fail the late ones."""
        room, now = self._room, time.monotonic()
        while room:
            wait = room[0]
            if wait.conn.dead or wait.conn.calls.get(wait.rid) is not wait:
                room.popleft()   # its client left or cancelled it
                continue
            remaining = None if wait.deadline is None else wait.deadline - now
            if remaining is not None and remaining <= 0:
                room.popleft()
                wait.conn.calls.pop(wait.rid, None)
                self._reply_error(wait.conn, wait.rid, _no_room())
                continue
            del wait.conn.calls[wait.rid]
            if not self._submit(wait.conn, wait.rid, wait.value, remaining, wait.priority):
                wait.conn.calls[wait.rid] = wait
                break
            room.popleft()
        # the late ones behind a call that still waits must not wait for it
        for wait in [x for x in room if x.deadline is not None and x.deadline <= now]:
            room.remove(wait)
            if wait.conn.calls.pop(wait.rid, None) is wait:
                self._reply_error(wait.conn, wait.rid, _no_room())

    def _on_result(self, call: _Call, value: Any) -> None:
        """The core delivered call's output (usually in the worker thread); never raises."""
        conn = call.conn
        if conn.calls.pop(call.rid, None) is None or conn.dead:
            return   # withdrawn by its caller, or the caller's process is gone
        try:
            if type(value) in w.PLAIN:
                self._queue_reply(conn, (w.RESULT, call.rid, value, None), [])
                return
            try:
                payload, buffers = w.dumps_payload(value)
            except BaseException as err:   # even SystemExit from a __reduce__: the caller gets an answer
                self._reply_error(conn, call.rid, BatchedFnError(
                    f"output of type {type(value).__name__} cannot be pickled: {type(err).__name__}: {err}"))
                return
            self._queue_reply(conn, (w.RESULT, call.rid, payload, tuple(b.nbytes for b in buffers)), buffers)
        except BaseException:
            log.exception("batched_fn: shared %r: a reply could not be queued", self.name)

    def _on_error(self, call: _Call, exc: BaseException) -> None:
        conn = call.conn
        if conn.calls.pop(call.rid, None) is None or conn.dead:
            return
        try:
            self._reply_error(conn, call.rid, exc)
        except BaseException:
            log.exception("batched_fn: shared %r: a reply could not be queued", self.name)

    def _drop(self, conn: _Conn) -> None:
        """The client went away: withdraw its queued calls, forget it (I/O thread)."""
        if conn.dead:
            return
        conn.dead = True
        self._conns.pop(conn.fd, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        with conn.send_lock:   # not while a worker writes to it
            conn.sock.close()
            conn.sendq.clear()
        calls = list(conn.calls.values())
        conn.calls.clear()
        for call in calls:
            if isinstance(call, _Call):
                call.withdrawn = True
                if call.request is not None:   # withdrawn if still queued; a result in a batch is discarded
                    self.entry.cancel(call.request)

    def _flush_dirty(self) -> None:
        with self._mutex:
            dirty = list(self._dirty)
            self._dirty.clear()
        for conn in dirty:
            self._flush(conn)

    def _write_backlog(self, conn: _Conn) -> None:
        with conn.send_lock:
            if conn.dead:
                return
            try:
                done = conn.sendq.send(conn.sock)
            except OSError:
                done = None
            resume = conn.paused and conn.sendq.nbytes <= MAX_REPLY_BACKLOG // 2
            if done:
                conn.waiting_write = False
            if resume:
                conn.paused = False
            if done or resume:
                self._update_events(conn)
        if done is None:
            self._drop(conn)

    # ------------------------------------------------------------ replies (any thread)

    def _queue_reply(self, conn: _Conn, record: Any, buffers: list[memoryview], urgent: bool = False) -> None:
        """Queue a reply; a worker's results go out after its batch, anything else soon.

        urgent: an error, which a worker may deliver outside any batch (a
        request expired while collecting, a broken worker's Closed), when no
        batch listener runs after it.
        """
        conn.outbox.put(record, buffers)
        with self._mutex:
            self._dirty.add(conn)
        if threading.current_thread() is not self._thread and (
                urgent or threading.get_ident() not in self._flushers):
            self._wake()   # the I/O thread writes it

    def _reply_error(self, conn: _Conn, rid: int, exc: BaseException) -> None:
        last, encoded = self._last_error
        if last is not exc:   # a batch's error goes to all its callers: encode it once
            encoded = _encode_error(exc)
            self._last_error = (exc, encoded)
        self._queue_reply(conn, (w.ERROR, rid, *encoded), [], urgent=True)

    def _flush(self, conn: _Conn) -> None:
        """Write conn's queued replies as one frame, as far as the socket takes it now (any thread)."""
        if conn.dead:
            return
        with conn.send_lock:
            if conn.dead:
                return
            records, buffers, _ = conn.outbox.take()
            if not records:
                return
            try:
                conn.sendq.extend(w.encode_frame(records, buffers))
            except Exception as exc:   # this connection only: the I/O thread reads its end and drops it
                log.warning("batched_fn: shared %r: closing a connection: its replies could not be "
                            "encoded (%s: %s)", self.name, type(exc).__name__, exc)
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if conn.waiting_write:
                return   # the I/O thread writes it when the socket takes more
            try:
                if conn.sendq.send(conn.sock):
                    return
            except OSError:
                return   # the I/O thread sees the connection fail and drops it
            conn.waiting_write = True
        if threading.current_thread() is self._thread:
            self._watch_write(conn)
        else:
            with self._mutex:
                self._want_write.add(conn)
            self._wake()

    def _after_batch(self, info: Any) -> None:
        """Batch listener, in the worker: send the batch's replies, one write per client."""
        self._flushers.add(threading.get_ident())
        with self._mutex:
            dirty = list(self._dirty)
            self._dirty.clear()
        for conn in dirty:
            self._flush(conn)
        if self._room or self._drain_until is not None:
            self._wake()   # room came; or closing: the I/O thread looks whether all is delivered

    # ------------------------------------------------------------ withdrawal

    def withdraw(self, wait: bool = True) -> None:
        """Give up the name: flush replies, close every connection (callers get Closed).

        wait=False (close() from inside the handler): the running batch's and
        the queued calls' replies are still delivered, then the name goes.
        """
        if self._withdrawn:
            return
        if not wait:
            self._drain_until = time.monotonic() + _DRAIN_SECONDS
        self._withdrawn = True
        with self._mutex:
            if not self._fds_closed:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    def _teardown(self) -> None:
        """In the I/O thread on its way out: last replies, then close everything."""
        self._withdrawn = True
        self._listener.close()
        closed = Closed(f"shared function {self.name!r} was closed")
        for wait in self._room:   # never queued: the function is closing
            if wait.conn.calls.pop(wait.rid, None) is wait:
                self._reply_error(wait.conn, wait.rid, closed)
        self._room.clear()
        self._flush_dirty()
        for conn in list(self._conns.values()):
            with conn.send_lock:
                if conn.sendq:
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(1.0)
                    try:
                        while not conn.sendq.send(conn.sock):
                            pass
                    except OSError:
                        pass
            self._drop(conn)
        self._sel.close()
        with self._mutex:   # their numbers may be reused from now on: never touch them again
            self._fds_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        remove_name(self._dir, self.name, self._lock_fd)   # releases the name

    def _forget_after_fork(self) -> None:
        """In a forked child: the name stays the parent's; close our copies quietly."""
        self._withdrawn = True
        if self._fds_closed:
            return
        self._fds_closed = True
        for obj in [self._listener, *(c.sock for c in self._conns.values())]:
            obj.close()
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _no_room() -> BaseException:
    from .._batchcore import no_room_error
    return no_room_error()


def _forget_all_after_fork() -> None:
    for owner in list(_OWNERS):
        owner._forget_after_fork()
    _OWNERS.clear()


os.register_at_fork(after_in_child=_forget_all_after_fork)
