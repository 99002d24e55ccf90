/* The adaptive batching delay of max_delay="auto": per batch, how long to wait.
 *
 * Pure C, no Python.h: the collector calls it with or without the GIL.  One
 * bc_delay belongs to one channel; the caller serialises every call on it
 * (the channel does so with the GIL), so it holds no lock and no atomic.
 * Times are CLOCK_MONOTONIC ns passed in by the caller (tests pass a fake
 * clock); nothing here reads a clock.
 *
 * The model, measured as the channel runs:
 *   - the handler's time by batch size, fitted as h(n) = a + c*n over recent
 *     batches; a is the fixed cost a batch pays whatever its size;
 *   - how soon the next input comes once the worker could dispatch: S, the
 *     time from max(last arrival, start of the wait) to the next arrival.
 *     hit  = share of S at most min(a, the last batch's time) (someone comes
 *            within one fixed cost; the last batch's time keeps one long
 *            batch, which inflates a for a while, from making a lone
 *            caller's next call look like a burst),
 *     gap  = mean of those short S (the pace of a burst or a stream).
 * Waiting for one more input saves about a (one batch's fixed cost shared
 * once more) with chance hit, and costs every one of the n inputs held the
 * wait: gap when someone comes, the whole silence window when nobody does.
 * So the worker waits while
 *       hit * a  >  k * n * (hit * gap + (1 - hit) * window)
 * k = BC_DELAY_COST_WEIGHT > 1 asks the gain to pay for the added latency.
 * and no longer than `window` of silence after the last arrival, nor
 * min(cap, a) after the batch could first have run.  At one closed-loop
 * caller every S is a whole handler run (> a): hit -> 0 and it dispatches at
 * once, as max_delay=0 does.  With many callers S is the short gap between
 * their resubmissions: it waits for the burst and stops when it ends.
 */
#ifndef BATCHCORE_DELAY_H
#define BATCHCORE_DELAY_H

#include <stdint.h>

/* Share of gap and hit kept per new sample (an EWMA over ~10 arrivals). */
#define BC_DELAY_KEEP 0.9
/* Share of the handler fit's weight kept per batch (~20 batches). */
#define BC_DELAY_FIT_KEEP 0.95
/* A wait ends after this many typical gaps without an arrival. */
#define BC_DELAY_SILENCE 2.0
/* Waiting must gain this many times what it costs: the latency every held
 * input pays counts for more than the throughput won (a Poisson stream of
 * fewer than ~2 arrivals per fixed cost does not wait). */
#define BC_DELAY_COST_WEIGHT 2.0
/* The shortest silence window, ns: below it timer wake-ups dominate. */
#define BC_DELAY_MIN_WINDOW_NS 20000.0

typedef struct bc_delay {
    int64_t cap_ns;   /* auto_max_delay in ns: the longest a batch is held open */
    int64_t ref_ns;   /* max(last arrival seen, start of the current wait); -1: no arrival yet */
    double gap_ns;    /* EWMA of the short S (<= a), ns; 0: none seen yet */
    double hit;       /* EWMA of [S <= min(a, last_ns)], in 0..1 */
    double last_ns;   /* the handler time of the last batch, ns; 0: none yet */
    /* Exponentially weighted sums over batches for the least-squares fit of
     * handler ns against batch size: weight, n, n^2, ns, n*ns. */
    double w, wn, wnn, wh, wnh;
} bc_delay;

/* A policy that knows nothing yet (it dispatches at once until it learns). */
static inline void bc_delay_init(bc_delay *d, int64_t cap_ns) {
    d->cap_ns = cap_ns;
    d->ref_ns = -1;
    d->gap_ns = 0.0;
    d->hit = 0.0;
    d->last_ns = 0.0;
    d->w = d->wn = d->wnn = d->wh = d->wnh = 0.0;
}

/* Feed one batch's handler time: n inputs ran in ns. */
static inline void bc_delay_record(bc_delay *d, int64_t n, int64_t ns) {
    double x = (double)n, y = (double)ns;
    if (n <= 0 || ns < 0)
        return;
    d->last_ns = y;
    d->w = BC_DELAY_FIT_KEEP * d->w + 1.0;
    d->wn = BC_DELAY_FIT_KEEP * d->wn + x;
    d->wnn = BC_DELAY_FIT_KEEP * d->wnn + x * x;
    d->wh = BC_DELAY_FIT_KEEP * d->wh + y;
    d->wnh = BC_DELAY_FIT_KEEP * d->wnh + x * y;
}

/* a, the fixed ns per batch of the fit h(n) = a + c*n (0: no batch seen).
 * With batch sizes too alike to fit a slope, the mean time counts as fixed. */
static inline double bc_delay_fixed_ns(const bc_delay *d) {
    double mn, mh, var, c, a;
    if (d->w <= 0.0)
        return 0.0;
    mn = d->wn / d->w;
    mh = d->wh / d->w;
    var = d->wnn / d->w - mn * mn;
    if (var < 0.25)
        return mh;
    c = (d->wnh / d->w - mn * mh) / var;
    if (c < 0.0)
        c = 0.0;
    a = mh - c * mn;
    return a < 0.0 ? 0.0 : (a > mh ? mh : a);
}

/* The silence window, ns: how long without an arrival ends a wait. */
static inline double bc_delay_window_ns(const bc_delay *d, double a) {
    double w = BC_DELAY_SILENCE * d->gap_ns;
    if (w < BC_DELAY_MIN_WINDOW_NS)
        w = BC_DELAY_MIN_WINDOW_NS;
    return w > a ? a : w;
}

/* Feed one input taken into the forming batch, which arrived at t_ns. */
static inline void bc_delay_arrival(bc_delay *d, int64_t t_ns) {
    double s, a;
    if (d->ref_ns >= 0) {
        s = t_ns > d->ref_ns ? (double)(t_ns - d->ref_ns) : 0.0;
        a = bc_delay_fixed_ns(d);
        if (a > d->last_ns)
            a = d->last_ns;
        if (a > 0.0) {
            if (s <= a) {
                d->hit = BC_DELAY_KEEP * d->hit + (1.0 - BC_DELAY_KEEP);
                d->gap_ns = d->gap_ns > 0.0 ? BC_DELAY_KEEP * d->gap_ns + (1.0 - BC_DELAY_KEEP) * s
                                            : (s > 1.0 ? s : 1.0);
            } else {
                d->hit = BC_DELAY_KEEP * d->hit;
            }
        }
    }
    if (t_ns > d->ref_ns)
        d->ref_ns = t_ns;
}

/* Expected gain minus weighted cost (ns) of waiting for one more input with
 * n held: > 0 means waiting pays.  *per_input gets the weighted cost per
 * input held (ns), for bc_delay_target. */
static inline double bc_delay_margin(const bc_delay *d, double a, int64_t n, double *per_input) {
    double cost = BC_DELAY_COST_WEIGHT * (d->hit * d->gap_ns + (1.0 - d->hit) * bc_delay_window_ns(d, a));
    *per_input = cost;
    return d->hit * a - (double)n * cost;
}

/* Decide for a forming batch of n >= 1 inputs at time now_ns.
 * since_ns: when the batch could first have run (max of its first arrival
 * and the moment the worker became free to collect).
 * Returns -1 to dispatch now, else the time to look again (wake earlier if
 * the batch reaches bc_delay_target inputs). */
static inline int64_t bc_delay_decide(bc_delay *d, int64_t now_ns, int64_t n, int64_t since_ns) {
    double a = bc_delay_fixed_ns(d), per_input, limit;
    int64_t wake, until;
    if (since_ns > d->ref_ns)
        d->ref_ns = since_ns;   /* silence counts from when waiting began */
    if (n <= 0 || a <= 0.0 || d->gap_ns <= 0.0)
        return -1;
    if (bc_delay_margin(d, a, n, &per_input) <= 0.0)
        return -1;
    wake = d->ref_ns + (int64_t)bc_delay_window_ns(d, a);
    limit = a < (double)d->cap_ns ? a : (double)d->cap_ns;
    until = since_ns + (int64_t)limit;
    if (until < wake)
        wake = until;
    return wake > now_ns ? wake : -1;
}

/* The batch size at which waiting stops paying: wake the collector once the
 * batch holds this many (1 .. max_items). */
static inline int64_t bc_delay_target(const bc_delay *d, int64_t max_items) {
    double a = bc_delay_fixed_ns(d), per_input, target;
    if (a <= 0.0 || d->gap_ns <= 0.0)
        return 1;
    bc_delay_margin(d, a, 0, &per_input);
    if (per_input <= 0.0)
        return max_items;
    target = d->hit * a / per_input;
    if (target >= (double)max_items)
        return max_items;
    if (target <= 1.0)
        return 1;
    return (double)(int64_t)target < target ? (int64_t)target + 1 : (int64_t)target;
}

#endif /* BATCHCORE_DELAY_H */
