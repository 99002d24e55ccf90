# Declarations of shm_ring.h for Cython: an SPSC byte ring shared by two processes.
from libc.stdint cimport uint32_t, int64_t

cdef extern from "shm_ring.h" nogil:
    ctypedef struct bc_shm_ring:
        unsigned long long capacity
    size_t bc_shm_region_size(size_t capacity)
    int bc_shm_init(void *mem, size_t size)
    int bc_shm_check(void *mem, size_t size)
    int bc_shm_push(bc_shm_ring *r, const void *p, uint32_t n)
    int64_t bc_shm_next_len(bc_shm_ring *r)
    void bc_shm_pop(bc_shm_ring *r, void *out)
    int bc_shm_wait(bc_shm_ring *r, int64_t deadline_ns)
