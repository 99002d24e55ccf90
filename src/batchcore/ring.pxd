# Declarations of ring.h for Cython (the ring itself is C; see ring.h).
cdef extern from "ring.h" nogil:
    ctypedef struct bc_ring:
        pass
    size_t bc_ring_round_up(size_t n)
    bc_ring *bc_ring_new(size_t capacity)
    void bc_ring_free(bc_ring *r)
    bint bc_ring_push(bc_ring *r, void *item)
    bint bc_ring_pop(bc_ring *r, void **out)
    bint bc_ring_valid(const bc_ring *r)
