"""The shared-memory ring (src/batchcore/shm_ring.h through batched_fn._batchcore's ShmRing) from Python.

The native stress test (tests/c/test_shm_ring.c, `make tsan`) hammers the
ring itself; these check the Python wrapper and one cross-process hand-off.
"""

from __future__ import annotations

import mmap
import os
import re
import time

import pytest

from batched_fn._batchcore import ShmRing, region_size


def test_messages_come_out_in_order_and_intact():
    ring = ShmRing(mmap.mmap(-1, region_size(1024)), create=True)
    assert ring.capacity == 1024
    msgs = [b"", b"a", b"x" * 300, bytes(range(256))]
    for m in msgs:
        assert ring.push(m)
    assert [ring.pop() for _ in msgs] == msgs
    assert ring.pop() is None


def test_full_ring_refuses_and_wraps_after_pops():
    ring = ShmRing(mmap.mmap(-1, region_size(256)), create=True)
    pushed = 0
    while ring.push(b"%03d" % pushed + b"." * 50):
        pushed += 1
    assert pushed == 256 // 64        # 4-byte length + 53 bytes, padded to 64
    for i in range(100):              # many laps around the ring
        assert ring.pop() == b"%03d" % i + b"." * 50
        assert ring.push(b"%03d" % (i + pushed) + b"." * 50)


def test_bad_buffers_and_messages_are_refused():
    with pytest.raises(ValueError, match=re.escape(
            f"invalid buffer value: expected at least {region_size(64)} bytes (got 100)")):
        ShmRing(bytearray(100), create=True)
    with pytest.raises(ValueError, match=re.escape(
            "invalid buffer value: it holds no ring made by ShmRing(..., create=True)")):
        ShmRing(bytearray(region_size(1024)))
    ring = ShmRing(bytearray(region_size(128)), create=True)
    with pytest.raises(ValueError, match=re.escape("message of 200 bytes does not fit a ring of 128 bytes")):
        ring.push(b"x" * 200)


def test_wait_times_out_on_an_empty_ring():
    ring = ShmRing(mmap.mmap(-1, region_size(1024)), create=True)
    start = time.monotonic()
    assert ring.wait(0.05) is False
    assert 0.04 < time.monotonic() - start < 2


def test_another_process_wakes_the_waiting_side():
    shared = mmap.mmap(-1, region_size(1 << 16))
    ring = ShmRing(shared, create=True)
    pid = os.fork()
    if pid == 0:   # the producer: its own wrapper over the same memory
        producer = ShmRing(shared)
        time.sleep(0.05)
        for i in range(1000):
            while not producer.push(b"m%d" % i):
                time.sleep(0)
        os._exit(0)
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 1000 and time.monotonic() < deadline:
        msg = ring.pop()
        if msg is None:
            ring.wait(1.0)
        else:
            got.append(msg)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert got == [b"m%d" % i for i in range(1000)]
