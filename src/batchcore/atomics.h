/* C11 atomics named by their memory order.
 *
 * Every call site says which order it relies on; the plain names of
 * <stdatomic.h> default to seq_cst, which hides that choice.  No Python.h here:
 * this header is shared by the extension and by the native stress tests.
 */
#ifndef BATCHCORE_ATOMICS_H
#define BATCHCORE_ATOMICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define BC_CACHE_LINE 64

#if defined(__GNUC__)
#  define BC_LIKELY(x)   __builtin_expect(!!(x), 1)
#  define BC_UNLIKELY(x) __builtin_expect(!!(x), 0)
#  define BC_INLINE      static inline __attribute__((always_inline))
#  define BC_NOINLINE    __attribute__((noinline))
#else
#  define BC_LIKELY(x)   (x)
#  define BC_UNLIKELY(x) (x)
#  define BC_INLINE      static inline
#  define BC_NOINLINE
#endif

typedef _Atomic(size_t)   bc_atomic_size;
typedef _Atomic(uint32_t) bc_atomic_u32;
typedef _Atomic(int64_t)  bc_atomic_i64;
typedef _Atomic(uint64_t) bc_atomic_u64;

/* size_t */
BC_INLINE size_t bc_load_relaxed(bc_atomic_size *p) { return atomic_load_explicit(p, memory_order_relaxed); }
BC_INLINE size_t bc_load_acquire(bc_atomic_size *p) { return atomic_load_explicit(p, memory_order_acquire); }
BC_INLINE size_t bc_load_seq_cst(bc_atomic_size *p) { return atomic_load_explicit(p, memory_order_seq_cst); }
BC_INLINE void bc_store_relaxed(bc_atomic_size *p, size_t v) { atomic_store_explicit(p, v, memory_order_relaxed); }
BC_INLINE void bc_store_release(bc_atomic_size *p, size_t v) { atomic_store_explicit(p, v, memory_order_release); }
BC_INLINE size_t bc_fetch_add_relaxed(bc_atomic_size *p, size_t v) { return atomic_fetch_add_explicit(p, v, memory_order_relaxed); }
BC_INLINE size_t bc_fetch_add_seq_cst(bc_atomic_size *p, size_t v) { return atomic_fetch_add_explicit(p, v, memory_order_seq_cst); }
BC_INLINE size_t bc_fetch_sub_relaxed(bc_atomic_size *p, size_t v) { return atomic_fetch_sub_explicit(p, v, memory_order_relaxed); }
BC_INLINE size_t bc_fetch_sub_seq_cst(bc_atomic_size *p, size_t v) { return atomic_fetch_sub_explicit(p, v, memory_order_seq_cst); }
/* Weak CAS: callers loop anyway, and a spurious failure only costs a retry. */
BC_INLINE int bc_cas_weak_relaxed(bc_atomic_size *p, size_t *expected, size_t desired) {
    return atomic_compare_exchange_weak_explicit(p, expected, desired, memory_order_relaxed, memory_order_relaxed);
}

/* uint32_t: futex words and small state machines */
BC_INLINE uint32_t bc_load_u32_acquire(bc_atomic_u32 *p) { return atomic_load_explicit(p, memory_order_acquire); }
BC_INLINE uint32_t bc_load_u32_relaxed(bc_atomic_u32 *p) { return atomic_load_explicit(p, memory_order_relaxed); }
BC_INLINE uint32_t bc_load_u32_seq_cst(bc_atomic_u32 *p) { return atomic_load_explicit(p, memory_order_seq_cst); }
BC_INLINE void bc_store_u32_release(bc_atomic_u32 *p, uint32_t v) { atomic_store_explicit(p, v, memory_order_release); }
BC_INLINE void bc_store_u32_seq_cst(bc_atomic_u32 *p, uint32_t v) { atomic_store_explicit(p, v, memory_order_seq_cst); }
BC_INLINE uint32_t bc_fetch_add_u32_seq_cst(bc_atomic_u32 *p, uint32_t v) { return atomic_fetch_add_explicit(p, v, memory_order_seq_cst); }
BC_INLINE uint32_t bc_fetch_sub_u32_seq_cst(bc_atomic_u32 *p, uint32_t v) { return atomic_fetch_sub_explicit(p, v, memory_order_seq_cst); }
/* Strong CAS with acq_rel: the winner of a state transition must see what the
 * previous owner wrote and publish what it wrote before the transition. */
BC_INLINE int bc_cas_u32_acq_rel(bc_atomic_u32 *p, uint32_t expected, uint32_t desired) {
    return atomic_compare_exchange_strong_explicit(p, &expected, desired, memory_order_acq_rel, memory_order_acquire);
}

/* int64_t: monotonic timestamps shared between threads */
BC_INLINE int64_t bc_load_i64_relaxed(bc_atomic_i64 *p) { return atomic_load_explicit(p, memory_order_relaxed); }
BC_INLINE void bc_store_i64_relaxed(bc_atomic_i64 *p, int64_t v) { atomic_store_explicit(p, v, memory_order_relaxed); }
BC_INLINE int64_t bc_load_i64_seq_cst(bc_atomic_i64 *p) { return atomic_load_explicit(p, memory_order_seq_cst); }
BC_INLINE void bc_store_i64_seq_cst(bc_atomic_i64 *p, int64_t v) { atomic_store_explicit(p, v, memory_order_seq_cst); }
/* Relaxed: counters and gauges that several threads change at once (stats);
 * whoever must see a count in order reads it after an acquire of its own. */
BC_INLINE int64_t bc_fetch_add_i64_relaxed(bc_atomic_i64 *p, int64_t v) { return atomic_fetch_add_explicit(p, v, memory_order_relaxed); }

/* uint64_t: event counters (never decreasing) */
BC_INLINE uint64_t bc_load_u64_relaxed(bc_atomic_u64 *p) { return atomic_load_explicit(p, memory_order_relaxed); }
BC_INLINE uint64_t bc_load_u64_seq_cst(bc_atomic_u64 *p) { return atomic_load_explicit(p, memory_order_seq_cst); }
BC_INLINE uint64_t bc_fetch_add_u64_relaxed(bc_atomic_u64 *p, uint64_t v) { return atomic_fetch_add_explicit(p, v, memory_order_relaxed); }

/* A full fence: orders an earlier store before a later load (the Dekker
 * pattern between "I queued an item" and "is anyone asleep?"). */
BC_INLINE void bc_fence_seq_cst(void) { atomic_thread_fence(memory_order_seq_cst); }

#endif /* BATCHCORE_ATOMICS_H */
