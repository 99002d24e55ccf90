/* A bounded multi-producer multi-consumer ring of opaque pointers.
 *
 * Design: an array of 2^k cells, each with its own sequence number, and two
 * free-running counters (tail for producers, head for consumers) on separate
 * cache lines.  A push or a pop is one CAS on its counter; "full" and "empty"
 * are read from the target cell's sequence number, never from a lock.
 *
 * Progress: push and pop are lock-free for the system (some thread always
 * completes), not wait-free: a producer that claimed a cell and was preempted
 * before publishing it makes consumers report that cell as empty until it
 * publishes.  Callers that sleep on "empty" must be woken by the producer
 * after it publishes (see park.h).
 *
 * Sequence numbers are stored relative to the cell's index, so memory that is
 * all zero is a valid empty ring: calloc() gives one without touching pages.
 *
 * Counters are compared only through their unsigned difference cast to a
 * signed type, which stays correct when they wrap around SIZE_MAX.
 *
 * No Python.h here: the ring moves void*, and ownership of what they point to
 * is the caller's business.
 */
#ifndef BATCHCORE_RING_H
#define BATCHCORE_RING_H

#include <stdlib.h>
#include <stdint.h>
#include <sys/types.h>
#include "atomics.h"

typedef struct {
    bc_atomic_size seq;   /* (sequence number - cell index); see above */
    void *item;           /* written by the producer that owns the cell, read
                             by the consumer that owns it next: ordered by seq */
} bc_cell;

typedef struct {
    /* Producers CAS this; alone on its line so pushes do not invalidate the
       consumers' head. */
    _Alignas(BC_CACHE_LINE) bc_atomic_size tail;
    /* Consumers CAS this. */
    _Alignas(BC_CACHE_LINE) bc_atomic_size head;
    /* Read-only after bc_ring_new(): shared freely. */
    _Alignas(BC_CACHE_LINE) size_t mask;
    bc_cell *cells;
} bc_ring;

/* 1 when n is a power of two >= 2. */
BC_INLINE int bc_ring_size_ok(size_t n) { return n >= 2 && (n & (n - 1)) == 0; }

/* Smallest power of two >= n (n >= 1), or 0 on overflow. */
BC_INLINE size_t bc_ring_round_up(size_t n) {
    size_t c = 2;
    while (c < n) {
        if (c > SIZE_MAX / 2) return 0;
        c <<= 1;
    }
    return c;
}

/* Allocate a ring of `capacity` cells (a power of two); NULL if the size is
 * invalid or memory is short.  Not thread-safe: publish the pointer to other
 * threads through a release store or a thread start. */
static inline bc_ring *bc_ring_new(size_t capacity) {
    if (!bc_ring_size_ok(capacity)) return NULL;
    bc_ring *r = (bc_ring *)aligned_alloc(BC_CACHE_LINE, sizeof(bc_ring));
    if (r == NULL) return NULL;
    r->cells = (bc_cell *)calloc(capacity, sizeof(bc_cell));
    if (r->cells == NULL) { free(r); return NULL; }
    bc_store_relaxed(&r->tail, 0);
    bc_store_relaxed(&r->head, 0);
    r->mask = capacity - 1;
    return r;
}

/* Free a ring no thread uses any more.  Items still in it are not touched. */
static inline void bc_ring_free(bc_ring *r) {
    if (r == NULL) return;
    free(r->cells);
    free(r);
}

BC_INLINE size_t bc_ring_capacity(const bc_ring *r) { return r->mask + 1; }

/* Push one item.  Returns 1, or 0 when the ring is full (nothing written).
 * Safe from any number of threads at once.  Never blocks, never takes a lock. */
BC_INLINE int bc_ring_push(bc_ring *r, void *item) {
    size_t pos = bc_load_relaxed(&r->tail);
    bc_cell *cell;
    for (;;) {
        size_t idx = pos & r->mask;
        cell = &r->cells[idx];
        /* acquire: pairs with the consumer's release in bc_ring_pop, so the
           consumer's read of cell->item happens before our write below. */
        size_t seq = bc_load_acquire(&cell->seq) + idx;
        intptr_t dif = (intptr_t)(seq - pos);   /* wrap-safe comparison */
        if (dif == 0) {
            /* The cell is free for lap `pos`: claim it.  relaxed is enough:
               the cell's seq, not the counter, publishes the data. */
            if (bc_cas_weak_relaxed(&r->tail, &pos, pos + 1)) break;
            /* pos was reloaded by the failed CAS */
        } else if (dif < 0) {
            return 0;   /* the cell still holds last lap's item: full */
        } else {
            pos = bc_load_relaxed(&r->tail);   /* another producer won */
        }
    }
    cell->item = item;
    /* release: publishes cell->item to the consumer that acquires seq. */
    bc_store_release(&cell->seq, pos + 1 - (pos & r->mask));
    return 1;
}

/* Pop one item into *out.  Returns 1, or 0 when no published item is at the
 * head (empty, or its producer has not finished publishing).  Safe from any
 * number of threads at once. */
BC_INLINE int bc_ring_pop(bc_ring *r, void **out) {
    size_t pos = bc_load_relaxed(&r->head);
    bc_cell *cell;
    for (;;) {
        size_t idx = pos & r->mask;
        cell = &r->cells[idx];
        /* acquire: pairs with the producer's release, so cell->item is the
           producer's value once we own the cell. */
        size_t seq = bc_load_acquire(&cell->seq) + idx;
        intptr_t dif = (intptr_t)(seq - (pos + 1));   /* wrap-safe */
        if (dif == 0) {
            /* Published for lap `pos`: claim it (relaxed, as in push).  We may
               have read nothing yet: ownership starts only when the CAS wins. */
            if (bc_cas_weak_relaxed(&r->head, &pos, pos + 1)) break;
        } else if (dif < 0) {
            return 0;   /* not published yet: empty */
        } else {
            pos = bc_load_relaxed(&r->head);   /* another consumer won */
        }
    }
    *out = cell->item;
    /* release: our read of cell->item happens before the next lap's producer
       overwrites it.  The next lap of this cell is pos + capacity. */
    bc_store_release(&cell->seq, pos + r->mask + 1 - (pos & r->mask));
    return 1;
}

/* Items pushed and not popped: exact when no push or pop is in progress,
 * otherwise a snapshot that may be off by the number in progress. */
BC_INLINE size_t bc_ring_size_approx(bc_ring *r) {
    size_t tail = bc_load_relaxed(&r->tail);
    size_t head = bc_load_relaxed(&r->head);
    intptr_t d = (intptr_t)(tail - head);
    return d > 0 ? (size_t)d : 0;
}

/* Debug check of the geometry. */
BC_INLINE int bc_ring_valid(const bc_ring *r) {
    return r != NULL && r->cells != NULL && bc_ring_size_ok(r->mask + 1);
}

#endif /* BATCHCORE_RING_H */
