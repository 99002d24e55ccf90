"""The model process's side: export a BatchedFn under a name (``BatchedFn.share``).

One I/O thread accepts connections and reads requests; each request goes
into the BatchedFn through its public ``submit`` (so batching, ``channel_cap``,
cost, deadlines and ``stats()`` are the in-process ones).  A reply is encoded
when its future completes, usually in the worker thread while it delivers a
batch; the worker sends each connection's replies of the batch in one write
when the batch is done (a batch listener), other replies (timeouts,
rejections) go out from the I/O thread.

Thread safety (no GIL assumed): ``Owner._mutex`` guards the dirty and
want-write sets and the wake flag; each connection's ``lock`` guards its
outbox and ``send_lock`` the order of its writes; the connection table is
the I/O thread's alone; ``_OWNERS`` is changed under ``_OWNERS_LOCK``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import queue
import selectors
import socket
import struct
import threading
import time
import traceback
import weakref
from typing import Any

from ..errors import BatchedFnError
from . import _wire as w
from ._entry import Entry, Waiter
from ._names import check_name, lock_path, runtime_dir, socket_path

__all__ = ["Owner", "share", "DEFAULT_MAX_ITEM_BYTES"]

log = logging.getLogger("batched_fn")

#: lets a 1 MiB numpy array through with room to spare
DEFAULT_MAX_ITEM_BYTES = 4 << 20
_CRED = struct.Struct("3i")   # struct ucred: pid, uid, gid
_OWNERS: "weakref.WeakSet[Owner]" = weakref.WeakSet()
_OWNERS_LOCK = threading.Lock()


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


def share(bf: Any, name: str, *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> "Owner":
    """Export bf under name to other processes of this user; return the owner.

    Raises:
        TypeError, ValueError: name or max_item_bytes is invalid, or name is
            already shared by a live process.
    """
    check_name(name)
    if isinstance(max_item_bytes, bool) or not isinstance(max_item_bytes, int) or max_item_bytes < 1:
        raise ValueError(f"invalid max_item_bytes value: expected an int >= 1 (got {max_item_bytes!r})")
    existing = getattr(bf, "_share_owner", None)
    if existing is not None and not existing._withdrawn:
        raise ValueError(f"this function is already shared as {existing.name!r}")
    return Owner(bf, name, max_item_bytes)


def _encode_error(exc: BaseException) -> tuple[Any, ...]:
    """(pickled exception or None, type name, message, traceback text) of exc."""
    kind = type(exc)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "(unprintable)"
    tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__)) if exc.__traceback__ else ""
    try:
        pickled: bytes | None = pickle.dumps(exc, protocol=5)
    except Exception:
        pickled = None
    return pickled, type_name, message, tb


class _Conn:
    """One connected client process."""

    __slots__ = ("sock", "fd", "reader", "futures", "lock", "outbox", "out_buffers", "backlog",
                 "send_lock", "dead", "__weakref__")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = w.FrameReader()
        self.futures: dict[int, Waiter] = {}   # request id -> its waiter (single dict ops only)
        self.lock = threading.Lock()          # guards outbox, out_buffers
        self.outbox: list[Any] = []           # reply records not yet written
        self.out_buffers: list[memoryview] = []
        self.send_lock = threading.Lock()     # guards backlog and the order of writes
        self.backlog = b""                    # bytes the socket did not take yet
        self.dead = False


class Owner:
    """Serves one BatchedFn to other processes under one name."""

    def __init__(self, bf: Any, name: str, max_item_bytes: int) -> None:
        self.bf = bf
        self.name = name
        self.max_item_bytes = max_item_bytes
        directory = runtime_dir()
        self.path = socket_path(directory, name)
        self._lock_fd = os.open(lock_path(directory, name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ValueError(f"name {name!r} is already shared by a live process") from None
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
            os.close(self._lock_fd)   # give the name back
            raise

        self._hello = w.encode_frame([(w.HELLO, w.VERSION, max_item_bytes, os.getpid())], [])
        self._mutex = threading.Lock()          # guards _dirty, _wake_pending, _want_write
        self._dirty: set[_Conn] = set()          # conns with replies queued and no flush promised
        self._want_write: set[_Conn] = set()     # conns with a backlog for the I/O thread
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._flushers: set[int] = set()         # thread ids of workers (they flush after a batch)
        self._conns: dict[int, _Conn] = {}       # fd -> conn; the I/O thread's
        self._withdrawn = False
        # the last error encoded, with its encoding (one assignment: a racing
        # reader in another thread sees an old pair or the new one, never half)
        self._last_error: tuple[BaseException | None, tuple[Any, ...]] = (None, ())
        self._entry = Entry(bf)
        self._blocker: queue.SimpleQueue[Any] | None = None
        if bf.config.on_full == "block":   # waiting for room must not stall the I/O thread
            self._blocker = queue.SimpleQueue()
            threading.Thread(target=self._block_submitter, name=f"batched_fn-share-{name}-block",
                             daemon=True).start()
        bf.add_batch_listener(self._after_batch)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"batched_fn-share-{name}", daemon=True)
        self._thread.start()
        with _OWNERS_LOCK:
            _OWNERS.add(self)

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
        while not self._withdrawn:
            self._flush_dirty()   # replies queued by this thread (rejections)
            for key, events in sel.select():
                obj = key.fileobj
                if obj is listener:
                    self._accept()
                elif obj == wake_r:
                    self._drain_wake()
                else:
                    conn = key.data
                    if events & selectors.EVENT_WRITE:
                        self._write_backlog(conn)
                    if events & selectors.EVENT_READ and not conn.dead:
                        self._read(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            if peer_uid(sock) != os.getuid():   # the 0700 directory should make this impossible
                sock.close()
                continue
            w.send_all(sock, self._hello)
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns[conn.fd] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

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
            if not conn.dead:
                self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _wake(self) -> None:
        """Ask the I/O thread to look at _dirty and _want_write (any thread)."""
        with self._mutex:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _read(self, conn: _Conn) -> None:
        try:
            frames = conn.reader.read(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except (EOFError, OSError):
            self._drop(conn)
            return
        for records, data in frames:
            offset = 0
            for rec in records:
                if rec[0] == w.CALL:
                    if rec[4] is None:   # a plain value, in the record itself
                        self._call(conn, rec[1], rec[2], rec[3])
                        continue
                    buffers, offset = w.split_buffers(data, rec[4], offset)
                    try:
                        value = pickle.loads(rec[3], buffers=buffers)
                    except Exception as exc:
                        self._reply_error(conn, rec[1], TypeError(
                            f"input could not be unpickled in the model process: {type(exc).__name__}: {exc}"))
                        continue
                    self._call(conn, rec[1], rec[2], value)
                elif rec[0] == w.CANCEL:
                    waiter = conn.futures.pop(rec[1], None)
                    if waiter is not None:
                        self._entry.withdraw(waiter)

    def _call(self, conn: _Conn, rid: int, timeout: float | None, value: Any) -> None:
        if self._blocker is not None:   # the deadline counts from now, not from its turn
            deadline = None if timeout is None else time.monotonic() + timeout
            self._blocker.put((conn, rid, value, deadline))
            return
        self._submit(conn, rid, value, timeout)

    def _submit(self, conn: _Conn, rid: int, value: Any, timeout: float | None) -> None:
        waiter = Waiter(conn, rid, self._on_result, self._on_error)
        conn.futures[rid] = waiter
        try:
            self._entry.submit(waiter, value, timeout)
        except Exception as exc:   # Full, Closed, a cost error: this call only
            conn.futures.pop(rid, None)
            self._reply_error(conn, rid, exc)

    def _on_result(self, waiter: Waiter, value: Any) -> None:
        """The core delivered waiter's output (usually in the worker thread)."""
        conn = waiter.conn
        if conn.futures.pop(waiter.rid, None) is None or conn.dead:
            return   # withdrawn by its caller, or the caller's process is gone
        if type(value) in w.PLAIN:
            self._queue_reply(conn, (w.RESULT, waiter.rid, value, None), [])
            return
        try:
            payload, buffers = w.dumps_payload(value)
        except Exception as err:
            self._reply_error(conn, waiter.rid, BatchedFnError(
                f"output of type {type(value).__name__} cannot be pickled: {type(err).__name__}: {err}"))
            return
        self._queue_reply(conn, (w.RESULT, waiter.rid, payload, tuple(b.nbytes for b in buffers)), buffers)

    def _on_error(self, waiter: Waiter, exc: BaseException) -> None:
        conn = waiter.conn
        if conn.futures.pop(waiter.rid, None) is None or conn.dead:
            return
        self._reply_error(conn, waiter.rid, exc)

    def _block_submitter(self) -> None:
        """on_full='block': submit in arrival order, waiting for room here."""
        assert self._blocker is not None
        while True:
            item = self._blocker.get()
            if item is None:
                return
            conn, rid, value, deadline = item
            if conn.dead:
                continue
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._submit(conn, rid, value, timeout)

    def _drop(self, conn: _Conn) -> None:
        """The client went away: withdraw its queued calls, forget it."""
        conn.dead = True
        self._conns.pop(conn.fd, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        with conn.send_lock:   # not while a worker writes to it
            conn.sock.close()
        waiters = list(conn.futures.values())
        conn.futures.clear()
        for waiter in waiters:
            self._entry.withdraw(waiter)   # withdrawn if still queued; a result in a batch is discarded

    def _flush_dirty(self) -> None:
        with self._mutex:
            dirty = list(self._dirty)
            self._dirty.clear()
        for conn in dirty:
            self._flush(conn)

    def _write_backlog(self, conn: _Conn) -> None:
        with conn.send_lock:
            try:
                sent = conn.sock.send(conn.backlog)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                sent = -1
            else:
                conn.backlog = conn.backlog[sent:]
                if not conn.backlog:
                    self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if sent < 0:
            self._drop(conn)

    # ------------------------------------------------------------ replies (any thread)

    def _queue_reply(self, conn: _Conn, record: Any, buffers: list[memoryview]) -> None:
        with conn.lock:
            conn.outbox.append(record)
            if buffers:
                conn.out_buffers.extend(buffers)
        if threading.get_ident() in self._flushers:
            with self._mutex:   # the worker flushes after its batch
                self._dirty.add(conn)
        else:
            self._flush_from_other_thread(conn)

    def _flush_from_other_thread(self, conn: _Conn) -> None:
        with self._mutex:
            self._dirty.add(conn)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _reply_error(self, conn: _Conn, rid: int, exc: BaseException) -> None:
        last, encoded = self._last_error
        if last is not exc:   # a batch's error goes to all its callers: encode it once
            encoded = _encode_error(exc)
            self._last_error = (exc, encoded)
        self._queue_reply(conn, (w.ERROR, rid, *encoded), [])

    def _flush(self, conn: _Conn) -> None:
        """Write conn's queued replies in one frame (any thread)."""
        if conn.dead:
            return
        with conn.send_lock:
            with conn.lock:
                records, buffers = conn.outbox, conn.out_buffers
                if not records:
                    return
                conn.outbox, conn.out_buffers = [], []
            parts = w.encode_frame(records, buffers)
            if conn.backlog:
                conn.backlog += b"".join(parts)
                return
            try:
                conn.backlog = w.send_some(conn.sock, parts)
            except OSError:
                return   # the I/O thread sees the connection fail and drops it
            if not conn.backlog:
                return
        with self._mutex:
            self._want_write.add(conn)
        if threading.current_thread() is self._thread:
            self._drain_wake_modify(conn)
        else:
            self._wake()

    def _drain_wake_modify(self, conn: _Conn) -> None:
        with self._mutex:
            self._want_write.discard(conn)
        if not conn.dead:
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _after_batch(self, info: Any) -> None:
        """Batch listener, in the worker: send the batch's replies, one write per client."""
        if self._withdrawn:
            return
        self._flushers.add(threading.get_ident())
        with self._mutex:
            if not self._dirty:
                return
            dirty = list(self._dirty)
            self._dirty.clear()
        for conn in dirty:
            self._flush(conn)

    # ------------------------------------------------------------ withdrawal

    def withdraw(self) -> None:
        """Give up the name: flush replies, close every connection (callers get Closed)."""
        if self._withdrawn:
            return
        self._withdrawn = True
        if self._blocker is not None:
            self._blocker.put(None)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    def _teardown(self) -> None:
        """In the I/O thread on its way out: last replies, then close everything."""
        self._withdrawn = True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._listener.close()
        self._flush_dirty()
        for conn in list(self._conns.values()):
            if conn.backlog:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                try:
                    conn.sock.sendall(conn.backlog)
                except OSError:
                    pass
            self._drop(conn)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.close(self._lock_fd)   # releases the name

    def _forget_after_fork(self) -> None:
        """In a forked child: the name stays the parent's; close our copies quietly."""
        self._withdrawn = True
        for obj in [self._listener, *(c.sock for c in self._conns.values())]:
            obj.close()
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _forget_all_after_fork() -> None:
    for owner in list(_OWNERS):
        owner._forget_after_fork()
    _OWNERS.clear()


os.register_at_fork(after_in_child=_forget_all_after_fork)
