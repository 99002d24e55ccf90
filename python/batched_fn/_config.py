"""Validation of the knobs of :func:`batched_fn.batched_fn`.

Every message names the parameter, says what was expected and shows the value
with ``!r``: ``invalid max_delay value: expected a finite float >= 0 (got -1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ._batchcore import OnFull
from ._buckets import LengthBuckets

__all__ = ["Config", "check_timeout", "check_priority", "ON_FULL_POLICIES", "PRIORITY_MIN", "PRIORITY_MAX",
           "PRIORITY_AGING"]

#: share()'s default bound on one pickled input or output: lets a 1 MiB numpy array
#: through with room to spare
DEFAULT_MAX_ITEM_BYTES = 4 << 20

#: the accepted on_full values: the core's OnFull members, lower-cased
ON_FULL_POLICIES = tuple(policy.name.lower() for policy in OnFull)


def _bad(name: str, expected: str, value: object, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"invalid {name} value: expected {expected} (got {value!r})")


#: the core's limits: a batch's per-size timing table, and the ring's largest size
MAX_BATCH_SIZE = 1 << 16
MAX_CHANNEL_CAP = 1 << 24


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    expected = f"an int >= {low}" if high is None else f"an int between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, expected, value, TypeError)
    if value < low or (high is not None and value > high):
        raise _bad(name, expected, value)
    return value


def _seconds(name: str, value: object, *, positive: bool = False) -> float:
    expected = "a finite number > 0" if positive else "a finite float >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, expected, value, TypeError)
    try:
        seconds = float(value)
    except OverflowError:      # an int too large for a float
        raise _bad(name, expected, value) from None
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        raise _bad(name, expected, value)
    return seconds


def check_timeout(timeout: object) -> float | None:
    """A call's ``timeout=``: None (wait as long as it takes) or seconds >= 0."""
    if timeout is None:
        return None
    return _seconds("timeout", timeout)


#: the range of a call's priority= (a C int in the core)
PRIORITY_MIN = -(1 << 31)
PRIORITY_MAX = (1 << 31) - 1


def check_priority(priority: object) -> int:
    """A call's ``priority=``: an int from PRIORITY_MIN to PRIORITY_MAX; higher is served first.

    Raises TypeError (not an int, or a bool) or ValueError (out of range), naming the value.
    """
    return _int("priority", priority, PRIORITY_MIN, PRIORITY_MAX)


#: priority_aging's default: seconds of waiting that count as one priority level
PRIORITY_AGING = 1.0


#: auto_max_delay's default: the longest max_delay="auto" ever waits (seconds)
AUTO_MAX_DELAY = 0.01

#: max_keys's default: the most batch keys with requests queued at once.  A
#: key costs a small queue object while it has requests waiting, and is
#: forgotten when it has none; the bound keeps a key function that returns a
#: new key per input (an id, a float) from growing the worker's state.
DEFAULT_MAX_KEYS = 1024


def _delay(max_delay: object, auto_max_delay: object) -> tuple[float | str, float]:
    """(max_delay, auto_max_delay) checked: seconds or "auto", and the auto wait's bound."""
    if isinstance(max_delay, str):
        if max_delay != "auto":
            raise _bad("max_delay", "a finite float >= 0 or 'auto'", max_delay)
        longest = AUTO_MAX_DELAY if auto_max_delay is None else _seconds("auto_max_delay", auto_max_delay)
        return "auto", longest
    delay = _seconds("max_delay", max_delay)
    if auto_max_delay is not None:
        raise ValueError("auto_max_delay goes with max_delay='auto' "
                         f"(got max_delay={max_delay!r}, auto_max_delay={auto_max_delay!r})")
    return delay, AUTO_MAX_DELAY


def _context(context: object) -> dict[str, Any]:
    """context= checked: a mapping of argument name -> factory (None: no context)."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise _bad("context", "a mapping of name -> factory", context, TypeError)
    for name, factory in context.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise _bad("context", "keys that are valid argument names", name)
        if not callable(factory):
            raise _bad(f"context[{name!r}]", "a callable that builds the object", factory, TypeError)
    return dict(context)


def _keys(batch_key: object, max_keys: object, cost: object) -> int:
    """batch_key= checked with its companions; returns max_keys."""
    if batch_key is not None and not callable(batch_key):
        raise _bad("batch_key", "a callable of one input returning a hashable key", batch_key, TypeError)
    if isinstance(batch_key, LengthBuckets) and batch_key.length is None and cost is None:
        raise ValueError("batch_key=length_buckets() without a length function buckets by cost=: "
                         "give cost= and max_batch_cost= too, or a length function")
    if max_keys is None:
        return DEFAULT_MAX_KEYS
    if batch_key is None:
        raise ValueError(f"max_keys goes with batch_key (got max_keys={max_keys!r} and no batch_key)")
    return _int("max_keys", max_keys, 1, MAX_CHANNEL_CAP)


@dataclass(frozen=True)
class Config:
    """The validated knobs of one batched function."""

    max_batch_size: int
    max_delay: float | str          # seconds, or "auto"
    channel_cap: int | None
    num_workers: int
    context: Mapping[str, Callable[[], Any]]
    on_full: str
    cost: Callable[[Any], float] | None
    max_batch_cost: float | None
    on_batch: Callable[[Any], None] | None
    auto_max_delay: float = AUTO_MAX_DELAY   # the longest wait of max_delay="auto"
    batch_key: Callable[[Any], Any] | None = None   # input -> hashable key; keys never share a batch
    max_keys: int = DEFAULT_MAX_KEYS                 # most live keys (with batch_key)
    priority_aging: float | None = PRIORITY_AGING   # seconds waited worth one priority level; None: never

    @classmethod
    def build(
        cls,
        *,
        max_batch_size: object,
        max_delay: object,
        channel_cap: object,
        num_workers: object,
        context: object,
        on_full: object,
        cost: object,
        max_batch_cost: object,
        on_batch: object,
        auto_max_delay: object = None,
        batch_key: object = None,
        max_keys: object = None,
        priority_aging: object = PRIORITY_AGING,
    ) -> "Config":
        """Check every knob; raise TypeError/ValueError naming the first bad one."""
        size = _int("max_batch_size", max_batch_size, 1, MAX_BATCH_SIZE)
        delay, longest = _delay(max_delay, auto_max_delay)
        cap = None if channel_cap is None else _int("channel_cap", channel_cap, 1, MAX_CHANNEL_CAP)
        workers = _int("num_workers", num_workers, 1)
        context = _context(context)
        if not isinstance(on_full, str) or on_full not in ON_FULL_POLICIES:
            raise _bad("on_full", "one of " + ", ".join(map(repr, ON_FULL_POLICIES)), on_full)
        if (cost is None) != (max_batch_cost is None):
            raise ValueError("cost and max_batch_cost go together: give both or neither "
                             f"(got cost={cost!r}, max_batch_cost={max_batch_cost!r})")
        if cost is not None and not callable(cost):
            raise _bad("cost", "a callable of one input", cost, TypeError)
        bound = None if max_batch_cost is None else _seconds("max_batch_cost", max_batch_cost, positive=True)
        if on_batch is not None and not callable(on_batch):
            raise _bad("on_batch", "a callable taking a BatchInfo", on_batch, TypeError)
        keys = _keys(batch_key, max_keys, cost)
        aging = None if priority_aging is None else _seconds("priority_aging", priority_aging, positive=True)
        return cls(size, delay, cap, workers, context, on_full, cost, bound, on_batch,  # type: ignore[arg-type]
                   longest, batch_key, keys, aging)  # type: ignore[arg-type]
