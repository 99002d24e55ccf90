"""Frames on a shared function's Unix socket, and the two queues each end writes through.

A frame is a 16-byte header (meta length, data length), a pickled list of
records (the meta) and the out-of-band buffers of the records' payloads,
back to back (the data).  Many records travel in one frame: a sender takes
every record queued since its last write (:class:`Outbox`).  A payload is
pickled on its own (protocol 5) so that one that cannot be unpickled fails
its record only; its buffers (a numpy array's memory) are written from where
they are (:class:`SendQueue`) and read straight into the frame's own memory,
never re-pickled.

Records are tuples whose first field is the opcode.  A CALL carries its
optional fields in a dict (``opts``): a newer client may add fields there
without changing the record's shape; the model process ignores the keys it
does not know.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections import deque
from typing import Any, Iterator

__all__ = ["HEADER", "VERSION", "MAX_FRAME_BYTES", "ProtocolError", "encode_frame", "Outbox", "SendQueue",
           "FrameReader", "split_buffers", "dumps_payload", "plain_size"]

HEADER = struct.Struct("<QQ")
#: a frame with a body larger than this is read into memory of its own
_BIG = 1 << 18
_CHUNK = 1 << 18
#: sendmsg takes at most IOV_MAX (1024) parts at once
_MAX_PARTS = 512

#: The largest frame (meta + data) a model process accepts from a client, unless
#: the item size limit needs more (then max_item_bytes + 1 MiB).  A client cuts
#: its writes into frames of at most the limit the model process announced.
MAX_FRAME_BYTES = 64 << 20

# Record opcodes, client -> model process
CALL = 0      # (CALL, id, payload, buffer lengths or None for a PLAIN payload, opts dict or None);
#               opts: "timeout" (float seconds), "priority" (int, absent: 0)
CANCEL = 1    # (CANCEL, id)
STATS = 6     # (STATS, id): answered with RESULT (stats, healthy)
# model process -> client
HELLO = 2     # (HELLO, VERSION, {"max_item_bytes", "max_frame_bytes", "pid"})
RESULT = 3    # (RESULT, id, payload, buffer lengths or None)
ERROR = 4     # (ERROR, id, pickled exception or None, type name, message, traceback text)
BYE = 5       # (BYE, message): the model process closes this connection, and why

VERSION = 2

#: types that travel inside the record itself (no pickling of their own:
#: they always pickle, and unpickle in any process)
PLAIN = frozenset({int, float, bool, type(None), str, bytes})


class ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


def plain_size(value: Any) -> int:
    """An upper bound of the pickled size of a PLAIN value, without pickling it."""
    kind = type(value)
    if kind is str:
        return 4 * len(value) + 9
    if kind is bytes:
        return len(value) + 9
    if kind is int:
        return value.bit_length() // 8 + 9
    return 9


def dumps_payload(value: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle value (protocol 5); its contiguous buffers stay out of band."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return data, []
    try:
        return data, [b.raw() for b in buffers]
    except BufferError:   # a non-contiguous buffer: keep everything in band
        return pickle.dumps(value, protocol=5), []


def encode_frame(records: list[Any], buffers: list[memoryview]) -> list[Any]:
    """The parts of one frame, ready for :meth:`SendQueue.extend`."""
    meta = pickle.dumps(records, protocol=5)
    size = 0
    for b in buffers:
        size += b.nbytes
    return [HEADER.pack(len(meta), size), meta, *buffers]


class Outbox:
    """Records (and their buffers) queued for one socket, taken all at once as one frame.

    Any thread may :meth:`put`; whoever writes :meth:`take` s everything
    queued since the last take.
    """

    __slots__ = ("_lock", "_records", "_buffers", "_nbytes")

    def __init__(self) -> None:
        self._lock = threading.Lock()   # guards _records, _buffers, _nbytes
        self._records: list[Any] = []
        self._buffers: list[memoryview] = []
        self._nbytes = 0

    def put(self, record: Any, buffers: list[memoryview] | None = None, nbytes: int = 0) -> None:
        """Queue one record; nbytes: its size, for cutting frames at a limit."""
        with self._lock:
            self._records.append(record)
            if buffers:
                self._buffers.extend(buffers)
            self._nbytes += nbytes

    def __bool__(self) -> bool:
        return bool(self._records)

    def take(self) -> tuple[list[Any], list[memoryview], int]:
        """Everything queued (records, buffers, summed nbytes); the outbox is empty after."""
        with self._lock:
            records, buffers, nbytes = self._records, self._buffers, self._nbytes
            self._records, self._buffers, self._nbytes = [], [], 0
        return records, buffers, nbytes


class SendQueue:
    """Bytes accepted for a non-blocking socket and not written yet.

    Parts are kept as they came (a numpy array's memory included); a partial
    write moves an offset into the first part, so a large reply is written in
    time linear in its size, a socket-buffer's worth per call, and the GIL is
    free between calls.  The caller serialises :meth:`extend` and :meth:`send`.
    """

    __slots__ = ("_parts", "nbytes")

    def __init__(self) -> None:
        self._parts: deque[memoryview] = deque()
        self.nbytes = 0   # bytes queued

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def extend(self, parts: list[Any]) -> None:
        for part in parts:
            view = part if isinstance(part, memoryview) else memoryview(part)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if view.nbytes:
                self._parts.append(view)
                self.nbytes += view.nbytes

    def send(self, sock: socket.socket) -> bool:
        """Write what the socket takes now; True once everything is written.

        Raises OSError (other than would-block) when the socket failed.
        """
        parts = self._parts
        while parts:
            chunk = list(parts) if len(parts) <= _MAX_PARTS else [parts[i] for i in range(_MAX_PARTS)]
            try:
                sent = sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                return False
            self.nbytes -= sent
            while sent:
                first = parts[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    parts.popleft()
                else:
                    parts[0] = first[sent:]   # a view: no copy
                    sent = 0
        return True

    def clear(self) -> None:
        self._parts.clear()
        self.nbytes = 0


def split_buffers(data: memoryview, lengths: tuple[int, ...], offset: int) -> tuple[list[memoryview], int]:
    """The buffers of one record, slices of the frame's data from offset."""
    out = []
    for n in lengths:
        if type(n) is not int or n < 0 or offset + n > len(data):
            raise ProtocolError(f"a record's buffer lengths {lengths!r} do not fit the frame's data")
        out.append(data[offset:offset + n])
        offset += n
    return out, offset


class FrameReader:
    """Reassembles frames from a stream socket, one ``recv`` per :meth:`read`.

    max_frame: the largest frame body accepted; a larger one raises
    ProtocolError before any memory is set aside for it.
    """

    def __init__(self, max_frame: int | None = None) -> None:
        self._buf = bytearray()
        self._scratch = bytearray(_CHUNK)
        self._scratch_view = memoryview(self._scratch)
        self._big: bytearray | None = None   # the body of a large frame being filled
        self._big_view: memoryview | None = None
        self._fill = 0
        self._meta_len = 0
        self.max_frame = max_frame

    def read(self, sock: socket.socket) -> list[tuple[list[Any], memoryview]]:
        """Receive once; return the frames completed (records, data).

        Raises EOFError when the peer closed the connection, BlockingIOError
        when a non-blocking socket had nothing, ProtocolError on a frame
        over the limit or whose meta is not a pickled list.
        """
        if self._big is not None:
            assert self._big_view is not None
            n = sock.recv_into(self._big_view[self._fill:])
            if n == 0:
                raise EOFError
            self._fill += n
            if self._fill < len(self._big):
                return []
            body = self._big
            self._big = self._big_view = None
            return [_split(body, self._meta_len)]
        n = sock.recv_into(self._scratch)   # into memory kept between reads: no allocation per read
        if n == 0:
            raise EOFError
        self._buf += self._scratch_view[:n]
        return list(self._frames())

    def _frames(self) -> Iterator[tuple[list[Any], memoryview]]:
        buf = self._buf
        pos, end = 0, len(buf)
        try:
            while end - pos >= HEADER.size:
                meta_len, data_len = HEADER.unpack_from(buf, pos)
                total = meta_len + data_len
                if self.max_frame is not None and total > self.max_frame:
                    raise ProtocolError(f"frame of {total} bytes exceeds the limit of {self.max_frame} bytes")
                have = end - pos - HEADER.size
                if have < total:
                    if total > _BIG:   # read the rest straight into the body's own memory
                        big = bytearray(total)
                        big[:have] = buf[pos + HEADER.size:]
                        self._big, self._big_view = big, memoryview(big)
                        self._fill, self._meta_len = have, meta_len
                        pos = end
                    break
                start = pos + HEADER.size
                # a copy: the data outlives the receive buffer (numpy arrays point into it)
                body = buf[start:start + total]
                pos = start + total
                yield _split(body, meta_len)
        finally:
            del buf[:pos]


def _split(body: bytearray, meta_len: int) -> tuple[list[Any], memoryview]:
    view = memoryview(body)
    try:
        records = pickle.loads(view[:meta_len])
    except Exception as exc:
        raise ProtocolError(f"undecodable frame metadata: {type(exc).__name__}: {exc}") from None
    if type(records) is not list:
        raise ProtocolError(f"frame metadata is a {type(records).__name__}, not a list of records")
    return records, view[meta_len:]
