/* A single-producer single-consumer byte ring in memory shared by two
 * processes, with futex wake-ups that work across processes (elsewhere, and
 * with BATCHCORE_PORTABLE_PARK, the consumer polls instead: see bc_shm_sleep).
 *
 *   bc_shm_init(mem, size)        lay a ring over size bytes (the creator, once)
 *   bc_shm_check(mem, size)       1 if mem holds a ring laid by bc_shm_init
 *   bc_shm_push(r, p, n)          producer: append one message; 0 if no room, -1 never fits
 *   bc_shm_next_len(r)            consumer: length of the next message, -1 if none
 *   bc_shm_pop(r, out)            consumer: copy the next message out, drop it
 *   bc_shm_wait(r, deadline_ns)   consumer: sleep until a push (or deadline, -1 none)
 *
 * A message is a 4-byte length and the bytes, padded to 8; it may wrap
 * around the end of the data area.  Positions only grow (64-bit), so
 * head == tail means empty with no extra flag.  The futex words are the
 * shared (not FUTEX_PRIVATE) kind: their key is the page, not the address
 * space, so a sleeper in one process is woken by a push from the other.
 * Everything in the region is plain data or lock-free atomics (address-free
 * on Linux), so each process may map it at its own address.
 * No Python.h: callers release the GIL around bc_shm_wait.
 */
#ifndef BATCHCORE_SHM_RING_H
#define BATCHCORE_SHM_RING_H

#include <string.h>
#include "atomics.h"
#include "park.h"

#if defined(__linux__) && !defined(BATCHCORE_PORTABLE_PARK)
/* Wake the consumer sleeping on w, from either process. */
static inline void bc_shm_wake(bc_atomic_u32 *w) {
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Sleep while *w == seq, until the deadline (-1: none) or a signal. */
static inline void bc_shm_sleep(bc_atomic_u32 *w, uint32_t seq, int64_t deadline_ns) {
    struct timespec ts, *tsp = NULL;
    if (deadline_ns >= 0) {
        ts.tv_sec = (time_t)(deadline_ns / 1000000000LL);
        ts.tv_nsec = (long)(deadline_ns % 1000000000LL);
        tsp = &ts;
    }
    /* shared futex (no _PRIVATE): the waker is another process */
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT_BITSET, seq, tsp, NULL, FUTEX_BITSET_MATCH_ANY);
}
#else
/* The portable fallback (see park.h) has no wake-up that crosses processes:
   the consumer polls the word every 50 us until it changes or the deadline
   passes.  Correct, and slower to notice a push. */
extern int nanosleep(const struct timespec *req, struct timespec *rem);   /* POSIX; hidden by -std=c11 */

static inline void bc_shm_wake(bc_atomic_u32 *w) { (void)w; }

static inline void bc_shm_sleep(bc_atomic_u32 *w, uint32_t seq, int64_t deadline_ns) {
    struct timespec nap = {0, 50000};
    while (bc_load_u32_acquire(w) == seq && (deadline_ns < 0 || bc_now_ns() < deadline_ns))
        nanosleep(&nap, NULL);
}
#endif

#define BC_SHM_MAGIC 0x62636873686d3031ULL   /* "bcshm01" */

typedef struct {
    uint64_t magic;
    uint64_t capacity;                 /* bytes in data[], a power of two */
    char pad0[BC_CACHE_LINE - 16];
    bc_atomic_size head;               /* bytes consumed; written by the consumer only */
    char pad1[BC_CACHE_LINE - sizeof(bc_atomic_size)];
    bc_atomic_size tail;               /* bytes produced; written by the producer only */
    char pad2[BC_CACHE_LINE - sizeof(bc_atomic_size)];
    bc_atomic_u32 seq;                 /* the futex word: bumped by a push that finds a sleeper */
    bc_atomic_u32 sleeping;            /* 1 while the consumer is going to sleep or asleep */
    char pad3[BC_CACHE_LINE - 8];
    unsigned char data[];
} bc_shm_ring;

/* The region size needed for a ring of capacity data bytes. */
static inline size_t bc_shm_region_size(size_t capacity) { return sizeof(bc_shm_ring) + capacity; }

/* Lay a ring over size bytes; capacity is the largest power of two that fits. 0: too small. */
static inline int bc_shm_init(void *mem, size_t size) {
    bc_shm_ring *r = (bc_shm_ring *)mem;
    size_t cap = 64;
    if (size < sizeof(bc_shm_ring) + cap) return 0;
    while (sizeof(bc_shm_ring) + cap * 2 <= size) cap *= 2;
    memset(mem, 0, sizeof(bc_shm_ring));
    r->capacity = cap;
    bc_store_relaxed(&r->head, 0);
    bc_store_relaxed(&r->tail, 0);
    bc_store_u32_seq_cst(&r->seq, 0);
    bc_store_u32_seq_cst(&r->sleeping, 0);
    /* seq_cst: the other process reads magic only after the region was handed over. */
    r->magic = BC_SHM_MAGIC;
    bc_fence_seq_cst();
    return 1;
}

static inline int bc_shm_check(void *mem, size_t size) {
    bc_shm_ring *r = (bc_shm_ring *)mem;
    return size >= sizeof(bc_shm_ring) && r->magic == BC_SHM_MAGIC && r->capacity >= 64 &&
           (r->capacity & (r->capacity - 1)) == 0 && sizeof(bc_shm_ring) + r->capacity <= size;
}

static inline void bc_shm_copy_in(bc_shm_ring *r, size_t pos, const void *src, size_t n) {
    size_t off = pos & (r->capacity - 1), first = r->capacity - off;
    if (first >= n) {
        memcpy(r->data + off, src, n);
    } else {
        memcpy(r->data + off, src, first);
        memcpy(r->data, (const unsigned char *)src + first, n - first);
    }
}

static inline void bc_shm_copy_out(bc_shm_ring *r, size_t pos, void *dst, size_t n) {
    size_t off = pos & (r->capacity - 1), first = r->capacity - off;
    if (first >= n) {
        memcpy(dst, r->data + off, n);
    } else {
        memcpy(dst, r->data + off, first);
        memcpy((unsigned char *)dst + first, r->data, n - first);
    }
}

static inline size_t bc_shm_footprint(size_t n) { return (4 + n + 7) & ~(size_t)7; }

/* Producer: append n bytes as one message and wake a sleeping consumer.
   Returns 1; 0 (nothing written) when the ring has no room now; -1 when
   the message is larger than the whole ring and never fits. */
static inline int bc_shm_push(bc_shm_ring *r, const void *p, uint32_t n) {
    size_t need = bc_shm_footprint(n);
    if (need > r->capacity) return -1;
    size_t tail = bc_load_relaxed(&r->tail);            /* only we write tail */
    size_t head = bc_load_acquire(&r->head);            /* acquire: the consumer is done with those bytes */
    if (need > r->capacity - (tail - head)) return 0;
    bc_shm_copy_in(r, tail, &n, 4);
    bc_shm_copy_in(r, tail + 4, p, n);
    bc_store_release(&r->tail, tail + need);            /* release: the bytes before the new tail */
    /* Dekker with bc_shm_wait: our tail store, the fence, then the read of
       sleeping; the consumer stores sleeping, fences, then re-reads tail.
       One of the two sees the other, so a wake-up is never lost. */
    bc_fence_seq_cst();
    if (bc_load_u32_relaxed(&r->sleeping)) {
        bc_fetch_add_u32_seq_cst(&r->seq, 1);
        bc_shm_wake(&r->seq);
    }
    return 1;
}

/* Consumer: the next message's length, or -1 when the ring is empty. */
static inline int64_t bc_shm_next_len(bc_shm_ring *r) {
    size_t head = bc_load_relaxed(&r->head);            /* only we write head */
    size_t tail = bc_load_acquire(&r->tail);            /* acquire: the message bytes are there */
    uint32_t n;
    if (head == tail) return -1;
    bc_shm_copy_out(r, head, &n, 4);
    return (int64_t)n;
}

/* Consumer: copy the next message (bc_shm_next_len bytes) to out and drop it. */
static inline void bc_shm_pop(bc_shm_ring *r, void *out) {
    size_t head = bc_load_relaxed(&r->head);
    uint32_t n;
    bc_shm_copy_out(r, head, &n, 4);
    bc_shm_copy_out(r, head + 4, out, n);
    bc_store_release(&r->head, head + bc_shm_footprint(n));   /* release: we are done reading */
}

/* Consumer: sleep until the ring is not empty, the deadline (CLOCK_MONOTONIC
   ns, -1 none) or a signal.  Returns 1 if a message is there, else 0. */
static inline int bc_shm_wait(bc_shm_ring *r, int64_t deadline_ns) {
    uint32_t seq = bc_load_u32_seq_cst(&r->seq);
    bc_store_u32_seq_cst(&r->sleeping, 1);
    bc_fence_seq_cst();
    if (bc_shm_next_len(r) < 0) bc_shm_sleep(&r->seq, seq, deadline_ns);
    bc_store_u32_seq_cst(&r->sleeping, 0);
    return bc_shm_next_len(r) >= 0;
}

#endif /* BATCHCORE_SHM_RING_H */
