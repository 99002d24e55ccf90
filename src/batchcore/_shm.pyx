# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""A shared-memory message ring between two processes (shm_ring.h).

``ShmRing(buffer, create=True)`` lays a ring over a writable buffer (an
``mmap`` of a shared file or memfd); the other process wraps its own mapping
of the same memory with ``create=False``.  One process pushes, the other
pops; the popping side sleeps in ``wait`` on a futex that the pushing side's
``push`` wakes across the process boundary.  Used by the benchmarks to
measure this transport against the Unix socket.

Thread safety: the ring itself is single-producer single-consumer (one
pushing and one popping thread, possibly in different processes); within a
process, ``push_lock`` and ``pop_lock`` keep several threads of one side
from interleaving their pushes or pops.
"""

cimport cython

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t
from shm_ring cimport (bc_shm_ring, bc_shm_region_size, bc_shm_init, bc_shm_check, bc_shm_push,
                       bc_shm_next_len, bc_shm_pop, bc_shm_wait)
from park cimport bc_now_ns


def region_size(size_t capacity) -> int:
    """Bytes of shared memory a ring of capacity data bytes needs."""
    return bc_shm_region_size(capacity)


cdef class ShmRing:
    """One direction of a shared-memory channel; see the module docstring."""

    cdef unsigned char[::1] mem   # keeps the mapping alive while the ring is used
    cdef bc_shm_ring *ring
    cdef cython.pymutex push_lock   # one pushing thread at a time in this process
    cdef cython.pymutex pop_lock    # one popping thread at a time in this process

    def __cinit__(self, object buffer, bint create=False):
        self.mem = memoryview(buffer).cast("B")
        cdef size_t size = self.mem.shape[0]
        if create:
            if not bc_shm_init(&self.mem[0], size):
                raise ValueError(f"invalid buffer value: expected at least {bc_shm_region_size(64)} bytes "
                                 f"(got {size})")
        elif not bc_shm_check(&self.mem[0], size):
            raise ValueError("invalid buffer value: it holds no ring made by ShmRing(..., create=True)")
        self.ring = <bc_shm_ring *>&self.mem[0]

    @property
    def capacity(self) -> int:
        """Data bytes of the ring."""
        return self.ring.capacity

    def push(self, const unsigned char[::1] data) -> bool:
        """Append data as one message and wake the other side; False when there is no room now.

        Raises ValueError when data is larger than the whole ring.
        """
        cdef Py_ssize_t n = data.shape[0]
        cdef int rc
        cdef const unsigned char *p = &data[0] if n else <const unsigned char *>""
        with self.push_lock:
            with nogil:
                rc = bc_shm_push(self.ring, p, <unsigned int>n)
        if rc < 0:
            raise ValueError(f"message of {n} bytes does not fit a ring of {self.ring.capacity} bytes")
        return rc == 1

    def pop(self):
        """The next message as bytes, or None when the ring is empty."""
        cdef int64_t n
        with self.pop_lock:
            n = bc_shm_next_len(self.ring)
            if n < 0:
                return None
            out = PyBytes_FromStringAndSize(NULL, n)
            bc_shm_pop(self.ring, PyBytes_AS_STRING(out))
        return out

    def wait(self, double timeout) -> bool:
        """Sleep (GIL released) until a message is there or timeout seconds pass; True if one is."""
        cdef int64_t deadline = bc_now_ns() + <int64_t>(timeout * 1e9)
        cdef int ok
        with nogil:
            ok = bc_shm_wait(self.ring, deadline)
        return ok != 0
