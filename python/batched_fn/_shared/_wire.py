"""Frames on a shared function's Unix socket.

A frame is a 16-byte header (meta length, data length), a pickled list of
records (the meta) and the out-of-band buffers of the records' payloads,
back to back (the data).  Many records travel in one frame: a sender takes
every record queued since its last write.  A payload is pickled on its own
(protocol 5) so that one that cannot be unpickled fails its record only; its
buffers (a numpy array's memory) are written from where they are and read
straight into the frame's own memory, never re-pickled.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any, Iterator

__all__ = ["HEADER", "encode_frame", "send_all", "send_some", "FrameReader", "split_buffers",
           "dumps_payload"]

HEADER = struct.Struct("<QQ")
#: a frame with a body larger than this is read into memory of its own
_BIG = 1 << 18
_CHUNK = 1 << 18
#: sendmsg takes at most IOV_MAX (1024) parts; join beyond this many
_MAX_PARTS = 512

# Record opcodes, client -> owner; buffer lengths None: the payload is a PLAIN value itself
CALL = 0      # (CALL, id, timeout, payload, buffer lengths[, priority]); no priority: 0
CANCEL = 1    # (CANCEL, id)
# owner -> client
HELLO = 2     # (HELLO, protocol version, max_item_bytes, owner pid)
RESULT = 3    # (RESULT, id, payload, buffer lengths)
ERROR = 4     # (ERROR, id, pickled exception or None, type name, message, traceback text)

VERSION = 1

#: types that travel inside the record itself (no pickling of their own:
#: they always pickle, and unpickle in any process)
PLAIN = frozenset({int, float, bool, type(None), str, bytes})


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
    """The parts of one frame, ready for :func:`send_all`."""
    meta = pickle.dumps(records, protocol=5)
    if not buffers:
        return [HEADER.pack(len(meta), 0), meta]
    size = 0
    for b in buffers:
        size += b.nbytes
    parts: list[Any] = [HEADER.pack(len(meta), size), meta]
    if len(buffers) > _MAX_PARTS:
        parts.append(b"".join(buffers))
    else:
        parts.extend(buffers)
    return parts


def _rest(parts: list[Any], sent: int) -> list[Any]:
    """The parts left after sent bytes went out."""
    for i, part in enumerate(parts):
        n = memoryview(part).nbytes
        if sent < n:
            return [memoryview(part).cast("B")[sent:], *parts[i + 1:]]
        sent -= n
    return []


def send_all(sock: socket.socket, parts: list[Any]) -> None:
    """Write every part on a blocking socket."""
    while parts:
        sent = sock.sendmsg(parts)
        parts = _rest(parts, sent)


def send_some(sock: socket.socket, parts: list[Any]) -> bytes:
    """Write what a non-blocking socket takes now; return what is left, joined."""
    try:
        sent = sock.sendmsg(parts)
    except (BlockingIOError, InterruptedError):
        sent = 0
    rest = _rest(parts, sent)
    return b"".join(rest) if rest else b""


def split_buffers(data: memoryview, lengths: tuple[int, ...], offset: int) -> tuple[list[memoryview], int]:
    """The buffers of one record, slices of the frame's data from offset."""
    out = []
    for n in lengths:
        out.append(data[offset:offset + n])
        offset += n
    return out, offset


class FrameReader:
    """Reassembles frames from a stream socket, one ``recv`` per :meth:`read`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scratch = bytearray(_CHUNK)
        self._scratch_view = memoryview(self._scratch)
        self._big: bytearray | None = None   # the body of a large frame being filled
        self._big_view: memoryview | None = None
        self._fill = 0
        self._meta_len = 0

    def read(self, sock: socket.socket) -> list[tuple[list[Any], memoryview]]:
        """Receive once; return the frames completed (records, data).

        Raises EOFError when the peer closed the connection, and
        BlockingIOError when a non-blocking socket had nothing.
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
        while end - pos >= HEADER.size:
            meta_len, data_len = HEADER.unpack_from(buf, pos)
            total = meta_len + data_len
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
        del buf[:pos]


def _split(body: bytearray, meta_len: int) -> tuple[list[Any], memoryview]:
    view = memoryview(body)
    return pickle.loads(view[:meta_len]), view[meta_len:]
