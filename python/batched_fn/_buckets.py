"""Length buckets: a batch key that keeps inputs of similar length together.

A batch of text is padded to its longest input, so a batch that mixes 5- and
250-token texts spends most of its compute on padding.  ``batch_key=
length_buckets(token_count)`` gives each input the bucket of its length as
its key; keyed batching (``batch_key=``) then never mixes buckets, and the
padding in a batch is bounded by its bucket's width.

Four ways to choose the edges:

- powers of two (the default): buckets ``(0, 8], (8, 16], (16, 32], ...``.  No
  input is padded to more than twice its length (beyond the first bucket) and
  nothing needs to be known in advance.
- explicit edges: ``length_buckets(n_tokens, edges=[16, 64, 128])``.
- ``edges="fit"``: at most ``buckets`` buckets whose edges are fitted to the
  lengths so that padding each length up to its bucket's edge costs the
  least in total (an exact dynamic programme over the distinct lengths).
  This is what padding costs when a bucket's batches are full; the edges
  crowd where lengths are dense and the last one is the longest length.
- ``edges="quantiles"``: ``buckets`` buckets that each get the same share of
  the inputs, so every key's batches fill at the same pace (where batching
  itself pays most, e.g. on a GPU, a bucket that sees 2 % of the inputs
  waits out its whole delay for small batches); but the last bucket is wide
  and pads much (bench_buckets.py measures both).

Both fitted kinds take a ``sample`` of lengths now or, without one, fit
themselves once to the first ``warmup`` lengths seen (powers of two until
then) and keep those edges, so keys stay stable.  (Connected callers fit
their own edges from their own lengths; a batch still holds one key only.)

Bucket keys are each bucket's upper edge (an int or float; ``math.inf`` for
lengths past the last explicit or fitted edge), so ``stats().by_key`` reads
as ``{16: ..., 32: ..., 64: ...}``.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Callable, Iterable, Sequence

__all__ = ["LengthBuckets", "length_buckets"]

#: the first power-of-two edge: shorter inputs share one bucket (their padding is small anyway)
SMALLEST_EDGE = 8
#: edges="quantiles" without a sample: lengths seen before the edges are fitted
WARMUP = 1000


def _length(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(type(value), "__index__") \
            and not hasattr(type(value), "__float__"):
        raise ValueError(f"invalid length value: {what} must return a finite number >= 0 (got {value!r})")
    try:
        n = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"invalid length value: {what} must return a finite number >= 0 (got {value!r})") from None
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"invalid length value: {what} must return a finite number >= 0 (got {value!r})")
    return n


def _check_edges(edges: Iterable[object]) -> tuple[float, ...]:
    try:
        out = tuple(edges)
    except TypeError:
        raise TypeError(f"invalid edges value: expected 'pow2', 'fit', 'quantiles' or a sequence of numbers "
                        f"(got {edges!r})") from None
    if not out or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0
                      for e in out) or any(a >= b for a, b in zip(out, out[1:])):  # type: ignore[operator]
        raise ValueError(f"invalid edges value: expected increasing finite numbers > 0 (got {list(out)!r})")
    return out  # type: ignore[return-value]


def quantile_edges(lengths: Sequence[float], buckets: int) -> tuple[float, ...]:
    """The upper edges of ``buckets`` buckets holding equal shares of lengths (the last one open).

    Equal lengths never straddle an edge, so fewer edges come back when the
    sample has few distinct values.
    """
    ordered = sorted(lengths)
    if not ordered:
        raise ValueError("invalid sample value: expected at least one length (got none)")
    edges: list[float] = []
    for i in range(1, buckets):
        edge = ordered[min(len(ordered) - 1, (i * len(ordered)) // buckets)]
        if edge > 0 and (not edges or edge > edges[-1]):
            edges.append(int(edge) if float(edge).is_integer() else edge)   # keys read as 16, not 16.0
    return tuple(edges)


#: edges="fit" works on at most this many distinct lengths (more are rounded up onto a grid of them)
_FIT_POINTS = 256


def padding_edges(lengths: Sequence[float], buckets: int) -> tuple[float, ...]:
    """The upper edges of at most ``buckets`` buckets that pad lengths the least.

    A bucket pads each of its lengths up to its upper edge; the edges
    minimise the total padding over lengths (an exact dynamic programme over
    the distinct lengths), and the last edge is the longest length.
    """
    ordered = sorted(lengths)
    if not ordered:
        raise ValueError("invalid sample value: expected at least one length (got none)")
    values = sorted(set(ordered))
    if len(values) > _FIT_POINTS:          # round lengths up onto a grid of quantiles
        grid = sorted({ordered[min(len(ordered) - 1, (i * len(ordered)) // _FIT_POINTS)]
                       for i in range(1, _FIT_POINTS)} | {ordered[-1]})
        ordered = [grid[bisect.bisect_left(grid, n)] for n in ordered]
        values = grid
    counts = dict.fromkeys(values, 0)
    for n in ordered:
        counts[n] += 1
    m = len(values)
    # prefix sums: items and summed lengths of values[:j]
    items, total = [0] * (m + 1), [0.0] * (m + 1)
    for j, v in enumerate(values):
        items[j + 1] = items[j] + counts[v]
        total[j + 1] = total[j] + counts[v] * v

    def pad(a: int, b: int) -> float:     # values[a..b] in one bucket, padded to values[b]
        return values[b] * (items[b + 1] - items[a]) - (total[b + 1] - total[a])

    k_max = min(buckets, m)
    inf = float("inf")
    best = [pad(0, b) for b in range(m)]            # one bucket over values[0..b]
    cut: list[list[int]] = [[-1] * m]
    for _ in range(1, k_max):
        nxt, where = [inf] * m, [-1] * m
        for b in range(m):
            for a in range(1, b + 1):              # the last bucket is values[a..b]
                cost = best[a - 1] + pad(a, b)
                if cost < nxt[b]:
                    nxt[b], where[b] = cost, a - 1
            if best[b] <= nxt[b]:                  # fewer buckets do as well
                nxt[b], where[b] = best[b], -2
        best = nxt
        cut.append(where)
    return _edges_from_cuts(values, cut)


def _edges_from_cuts(values: list[float], cut: list[list[int]]) -> tuple[float, ...]:
    """Walk padding_edges' table of cuts back from the last value: the chosen upper edges."""
    edges: list[float] = []
    b, k = len(values) - 1, len(cut) - 1
    while b >= 0:
        edges.append(values[b])
        while k > 0 and cut[k][b] == -2:
            k -= 1
        if k == 0:
            break
        b, k = cut[k][b], k - 1
    return tuple(int(e) if float(e).is_integer() else e for e in reversed(edges))


#: edges= names of the ways to fit edges to lengths
_FITTERS: dict[str, Callable[[Sequence[float], int], tuple[float, ...]]] = {
    "fit": padding_edges, "quantiles": quantile_edges}


class LengthBuckets:
    """A batch key: ``f(value)`` is the bucket of ``length(value)`` (its upper edge).

    Build one with :func:`length_buckets`.  It pickles (with its length
    function), so a shared function's callers in other processes compute keys
    themselves.
    """

    def __init__(self, length: Callable[[Any], float] | None, edges: tuple[float, ...] | None,
                 smallest: float, buckets: int, warmup: int, method: str = "quantiles") -> None:
        self.length = length
        self.smallest = smallest
        self.buckets = buckets
        self.warmup = warmup
        self.method = method          # how edges are fitted after warmup: "quantiles" or "fit"
        #: the fixed edges, or None: powers of two (while warming up, or for good)
        self.edges = edges
        self._seen: list[float] | None = [] if warmup else None   # lengths kept until the fit
        self._lock = threading.Lock()     # guards _seen and the one fit

    def __call__(self, value: Any) -> float:
        if self.length is None:
            raise TypeError("length_buckets() without a length function buckets by the cost= of the batched "
                            "function it is given to; call it through batched_fn(..., cost=...)")
        return self.bucket(_length(self.length(value), "the length function"))

    def bucket(self, n: float) -> float:
        """The bucket key of a length n (>= 0)."""
        if self._seen is not None:
            self._observe(n)
        edges = self.edges
        if edges is None:
            if n <= self.smallest:
                return self.smallest
            return 1 << (math.ceil(n) - 1).bit_length()
        i = bisect.bisect_left(edges, n)
        return edges[i] if i < len(edges) else math.inf

    def _observe(self, n: float) -> None:
        with self._lock:
            seen = self._seen
            if seen is None:
                return
            seen.append(n)
            if len(seen) < self.warmup:
                return
            self._seen = None
        self.edges = _FITTERS[self.method](seen, self.buckets) or None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        with self._lock:
            state["_seen"] = None if self._seen is None else list(self._seen)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        name = getattr(self.length, "__name__", repr(self.length)) if self.length is not None else "cost"
        if self.edges is not None:
            shown = [int(e) if float(e).is_integer() else e for e in self.edges]
            return f"length_buckets({name}, edges={shown})"
        state = f", fitting after {self.warmup}" if self._seen is not None else ""
        return f"length_buckets({name}, powers of two from {self.smallest:g}{state})"


def length_buckets(length: Callable[[Any], float] | None = None, edges: str | Sequence[float] = "pow2", *,
                   buckets: int = 4, sample: Iterable[float] | None = None, warmup: int = WARMUP,
                   smallest: float = SMALLEST_EDGE) -> LengthBuckets:
    """A ``batch_key`` that puts inputs of similar length in the same batches.

    ``batched_fn(embed, batch_key=length_buckets(token_count))``: inputs whose
    token counts fall in different buckets never share a batch, so a batch
    pads its inputs to at most its bucket's upper edge.

    Args:
        length: a function of one input returning its length (a number >= 0),
            e.g. its token count.  None: the batched function's ``cost=``
            is the length (give ``cost=`` and ``max_batch_cost=`` too).
        edges: ``"pow2"`` (default): buckets (0, smallest], then up to each
            power of two; a sequence of increasing upper edges (lengths past
            the last one share a last bucket, key ``math.inf``); ``"fit"``:
            at most ``buckets`` buckets whose edges pad the lengths the least
            (each padded up to its bucket's edge); or ``"quantiles"``:
            ``buckets`` buckets that each get the same share of inputs.
        buckets: with ``"fit"`` or ``"quantiles"``, how many buckets (>= 2).
        sample: with ``"fit"`` or ``"quantiles"``, lengths to fit the edges
            to now.  Without it the first ``warmup`` lengths seen are used
            (powers of two until then) and the edges stay fixed after.
        warmup: lengths seen before fitting, without a sample (>= 1).
        smallest: the first power-of-two edge (> 0).

    Raises:
        TypeError, ValueError: an argument is invalid; the message names it.
    """
    if length is not None and not callable(length):
        raise TypeError(f"invalid length value: expected a function of one input returning a number "
                        f"(got {length!r})")
    if isinstance(smallest, bool) or not isinstance(smallest, (int, float)) or not math.isfinite(smallest) \
            or smallest <= 0:
        raise ValueError(f"invalid smallest value: expected a finite number > 0 (got {smallest!r})")
    if isinstance(edges, str):
        if edges == "pow2":
            if sample is not None:
                raise ValueError("sample goes with edges='fit' or 'quantiles' (got edges='pow2')")
            return LengthBuckets(length, None, smallest, 0, 0)
        if edges not in _FITTERS:
            raise ValueError(f"invalid edges value: expected 'pow2', 'fit', 'quantiles' or a sequence of numbers "
                             f"(got {edges!r})")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2:
            raise ValueError(f"invalid buckets value: expected an int >= 2 (got {buckets!r})")
        if sample is not None:
            fitted = _FITTERS[edges]([_length(n, "sample") for n in sample], buckets)
            return LengthBuckets(length, fitted or None, smallest, buckets, 0, edges)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"invalid warmup value: expected an int >= 1 (got {warmup!r})")
        return LengthBuckets(length, None, smallest, buckets, warmup, edges)
    if sample is not None:
        raise ValueError("sample goes with edges='fit' or 'quantiles' (got explicit edges)")
    return LengthBuckets(length, _check_edges(edges), smallest, 0, 0)
