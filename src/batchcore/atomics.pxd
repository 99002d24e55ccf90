# Declarations of atomics.h for Cython.  The atomic types are opaque to Cython;
# they are only ever passed by address to the functions below.
from libc.stdint cimport uint32_t

cdef extern from "atomics.h" nogil:
    ctypedef size_t bc_atomic_size
    ctypedef uint32_t bc_atomic_u32

    bint BC_UNLIKELY(bint)

    size_t bc_load_relaxed(bc_atomic_size *p)
    size_t bc_fetch_add_seq_cst(bc_atomic_size *p, size_t v)
    size_t bc_fetch_sub_seq_cst(bc_atomic_size *p, size_t v)

    uint32_t bc_load_u32_acquire(bc_atomic_u32 *p)
    uint32_t bc_load_u32_relaxed(bc_atomic_u32 *p)
    uint32_t bc_load_u32_seq_cst(bc_atomic_u32 *p)
    void bc_store_u32_release(bc_atomic_u32 *p, uint32_t v)
    void bc_store_u32_seq_cst(bc_atomic_u32 *p, uint32_t v)
    uint32_t bc_fetch_add_u32_seq_cst(bc_atomic_u32 *p, uint32_t v)
    uint32_t bc_fetch_sub_u32_seq_cst(bc_atomic_u32 *p, uint32_t v)
    bint bc_cas_u32_acq_rel(bc_atomic_u32 *p, uint32_t expected, uint32_t desired)

    void bc_fence_seq_cst()
