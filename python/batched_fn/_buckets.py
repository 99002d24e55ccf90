"""Length buckets: a batch key that keeps inputs of similar length together.

A batch of text is padded to its longest input, so a batch that mixes 5- and
250-token texts spends most of its compute on padding.  ``batch_key=
length_buckets(token_count)`` gives each input the bucket of its length as
its key; keyed batching (``batch_key=``) then never mixes buckets, and the
padding in a batch is bounded by its bucket's width.

Three ways to choose the edges:

- powers of two (the default): buckets ``(0, 8], (8, 16], (16, 32], ...``.  No
  input is padded to more than twice its length (beyond the first bucket) and
  nothing needs to be known in advance.
- explicit edges: ``length_buckets(n_tokens, edges=[16, 64, 128])``.
- ``edges="quantiles"``: ``buckets`` buckets whose edges are quantiles of the
  lengths, from a ``sample`` given now or, without one, from the first
  ``warmup`` lengths seen (powers of two meanwhile; the edges are then fixed).
  Quantiles give every bucket the same share of the traffic, so every key's
  batches fill at the same pace: a bucket that saw 2 % of the inputs would
  wait out its whole delay for small batches.  Where lengths are dense the
  edges are close together, so most inputs get little padding.

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
        raise TypeError(f"invalid edges value: expected 'pow2', 'quantiles' or a sequence of numbers "
                        f"(got {edges!r})") from None
    if not out or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0
                      for e in out) or any(a >= b for a, b in zip(out, out[1:])):
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


class LengthBuckets:
    """A batch key: ``f(value)`` is the bucket of ``length(value)`` (its upper edge).

    Build one with :func:`length_buckets`.  It pickles (with its length
    function), so a shared function's callers in other processes compute keys
    themselves.
    """

    def __init__(self, length: Callable[[Any], float] | None, edges: tuple[float, ...] | None,
                 smallest: float, buckets: int, warmup: int) -> None:
        self.length = length
        self.smallest = smallest
        self.buckets = buckets
        self.warmup = warmup
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
        self.edges = quantile_edges(seen, self.buckets) or None

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
            the last one share a last bucket, key ``math.inf``); or
            ``"quantiles"``: ``buckets`` buckets with edges fitted to the
            lengths (each bucket gets the same share of inputs, so every
            key's batches fill at the same pace).
        buckets: with ``"quantiles"``, how many buckets (>= 2).
        sample: with ``"quantiles"``, lengths to fit the edges to now.
            Without it the first ``warmup`` lengths seen are used (powers of
            two until then) and the edges stay fixed after.
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
                raise ValueError("sample goes with edges='quantiles' (got edges='pow2')")
            return LengthBuckets(length, None, smallest, 0, 0)
        if edges != "quantiles":
            raise ValueError(f"invalid edges value: expected 'pow2', 'quantiles' or a sequence of numbers "
                             f"(got {edges!r})")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 2:
            raise ValueError(f"invalid buckets value: expected an int >= 2 (got {buckets!r})")
        if sample is not None:
            fitted = quantile_edges([_length(n, "sample") for n in sample], buckets)
            return LengthBuckets(length, fitted or None, smallest, buckets, 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"invalid warmup value: expected an int >= 1 (got {warmup!r})")
        return LengthBuckets(length, None, smallest, buckets, warmup)
    if sample is not None:
        raise ValueError("sample goes with edges='quantiles' (got explicit edges)")
    return LengthBuckets(length, _check_edges(edges), smallest, 0, 0)
