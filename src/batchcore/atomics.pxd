# Declarations of atomics.h for Cython.  The atomic types are opaque to Cython;
# they are only ever passed by address to the functions below.
from libc.stdint cimport uint32_t, int64_t, uint64_t

cdef extern from "atomics.h" nogil:
    ctypedef size_t bc_atomic_size
    ctypedef uint32_t bc_atomic_u32
    ctypedef int64_t bc_atomic_i64
    ctypedef uint64_t bc_atomic_u64

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

    int64_t bc_load_i64_relaxed(bc_atomic_i64 *p)
    void bc_store_i64_relaxed(bc_atomic_i64 *p, int64_t v)
    int64_t bc_load_i64_seq_cst(bc_atomic_i64 *p)
    void bc_store_i64_seq_cst(bc_atomic_i64 *p, int64_t v)
    int64_t bc_fetch_add_i64_relaxed(bc_atomic_i64 *p, int64_t v)

    uint64_t bc_load_u64_relaxed(bc_atomic_u64 *p)
    uint64_t bc_load_u64_seq_cst(bc_atomic_u64 *p)
    uint64_t bc_fetch_add_u64_relaxed(bc_atomic_u64 *p, uint64_t v)

    void bc_fence_seq_cst()
