/* Native stress test of ring.h: several producer and consumer threads, no
 * Python.  Run under ThreadSanitizer by `make tsan` (and ASan by `make asan`).
 *
 * Each item is tagged (producer, seq, magic).  Checks, one kind of bug each:
 *   - magic 0xdead -> 0xbeef after consumption: corruption or reuse;
 *   - a consumer sees each producer's seqs strictly increasing: FIFO;
 *   - an atomic count per item: delivered exactly once, none lost;
 *   - random stalls between operations vary the interleavings.
 * Usage: test_ring PRODUCERS CONSUMERS ITEMS_PER_PRODUCER
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include "ring.h"

#define MAGIC_LIVE 0xdeadu
#define MAGIC_DONE 0xbeefu
#define RING_SIZE 64   /* small, so "full" and wrap-around happen constantly */

typedef struct {
    unsigned producer;
    size_t seq;
    unsigned magic;
} item_t;

static bc_ring *ring;
static item_t *items;                 /* [producer * per + seq] */
static _Atomic(unsigned) *delivered;  /* same index: times consumed */
static size_t per;
static unsigned nprod, ncons;
static _Atomic(size_t) consumed_total;
static _Atomic(int) failed;

static void stall(unsigned *seed) {
    unsigned n = (unsigned)rand_r(seed) % 64;
    if (n == 0) sched_yield();
    for (volatile unsigned i = 0; i < n; i++) { }
}

static void *producer(void *arg) {
    unsigned id = (unsigned)(size_t)arg, seed = id * 7919u + 1;
    for (size_t s = 0; s < per; s++) {
        item_t *it = &items[id * per + s];
        it->producer = id; it->seq = s; it->magic = MAGIC_LIVE;
        while (!bc_ring_push(ring, it)) sched_yield();   /* full: retry */
        stall(&seed);
    }
    return NULL;
}

static void *consumer(void *arg) {
    unsigned id = (unsigned)(size_t)arg, seed = id * 104729u + 7;
    size_t *last = calloc(nprod, sizeof(size_t));   /* last seq + 1 per producer */
    size_t total = (size_t)nprod * per;
    while (atomic_load(&consumed_total) < total) {
        void *p;
        if (!bc_ring_pop(ring, &p)) { sched_yield(); continue; }
        item_t *it = p;
        if (it->magic != MAGIC_LIVE) {
            fprintf(stderr, "corrupt item: magic %#x\n", it->magic); atomic_store(&failed, 1);
        }
        if (it->seq + 1 <= last[it->producer]) {
            fprintf(stderr, "queue semantics violated: producer %u seq %zu after %zu\n",
                    it->producer, it->seq, last[it->producer] - 1);
            atomic_store(&failed, 1);
        }
        last[it->producer] = it->seq + 1;
        it->magic = MAGIC_DONE;
        if (atomic_fetch_add(&delivered[it->producer * per + it->seq], 1) != 0) {
            fprintf(stderr, "item dequeued twice: producer %u seq %zu\n", it->producer, it->seq);
            atomic_store(&failed, 1);
        }
        atomic_fetch_add(&consumed_total, 1);
        stall(&seed);
    }
    free(last);
    (void)id;
    return NULL;
}

int main(int argc, char **argv) {
    nprod = argc > 1 ? (unsigned)atoi(argv[1]) : 4;
    ncons = argc > 2 ? (unsigned)atoi(argv[2]) : 2;
    per = argc > 3 ? (size_t)atol(argv[3]) : 100000;
    if (bc_ring_new(3) != NULL || bc_ring_new(0) != NULL) {
        fprintf(stderr, "bc_ring_new accepted a size that is not a power of two >= 2\n");
        return 1;
    }
    ring = bc_ring_new(RING_SIZE);
    items = calloc((size_t)nprod * per, sizeof(item_t));
    delivered = calloc((size_t)nprod * per, sizeof(*delivered));
    if (!ring || !items || !delivered || !bc_ring_valid(ring)) { fprintf(stderr, "alloc failed\n"); return 1; }

    /* single-thread semantics first: empty, fill to capacity, full, FIFO */
    void *p;
    if (bc_ring_pop(ring, &p)) { fprintf(stderr, "pop from an empty ring succeeded\n"); return 1; }
    for (size_t i = 0; i < RING_SIZE; i++)
        if (!bc_ring_push(ring, (void *)(i + 1))) { fprintf(stderr, "push %zu failed below capacity\n", i); return 1; }
    if (bc_ring_push(ring, (void *)1)) { fprintf(stderr, "push into a full ring succeeded\n"); return 1; }
    for (size_t i = 0; i < RING_SIZE; i++)
        if (!bc_ring_pop(ring, &p) || p != (void *)(i + 1)) { fprintf(stderr, "FIFO broken at %zu\n", i); return 1; }

    pthread_t th[64];
    unsigned n = 0;
    for (unsigned i = 0; i < ncons; i++) pthread_create(&th[n++], NULL, consumer, (void *)(size_t)i);
    for (unsigned i = 0; i < nprod; i++) pthread_create(&th[n++], NULL, producer, (void *)(size_t)i);
    for (unsigned i = 0; i < n; i++) pthread_join(th[i], NULL);

    for (size_t i = 0; i < (size_t)nprod * per; i++) {
        if (atomic_load(&delivered[i]) != 1) {
            fprintf(stderr, "item %zu delivered %u times\n", i, atomic_load(&delivered[i]));
            return 1;
        }
    }
    if (bc_ring_pop(ring, &p)) { fprintf(stderr, "ring not empty at the end\n"); return 1; }
    if (atomic_load(&failed)) return 1;
    printf("ring ok: %u producers, %u consumers, %zu items, each delivered once in order\n",
           nprod, ncons, (size_t)nprod * per);
    bc_ring_free(ring);
    free(items);
    free((void *)delivered);
    return 0;
}
