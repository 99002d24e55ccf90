"""Cost-aware batches: cost= and max_batch_cost=."""

from __future__ import annotations

import re


import pytest

from batched_fn import BatchInfo, batched_fn
from helpers import (
    Blocker, wait_until,
)


def test_every_batch_respects_count_and_cost_bounds():
    blocker = Blocker()
    f = batched_fn(blocker, max_batch_size=4, max_delay=0, cost=lambda x: x, max_batch_cost=12)
    first = f.submit(1)
    wait_until(lambda: f.stats().running == 1)
    futures = [f.submit(c) for c in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3]
    blocker.release.set()
    assert [fut.result(5) for fut in futures] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    first.result(5)
    for batch in blocker.batches[1:]:
        assert len(batch) <= 4
        assert sum(batch) <= 12 or len(batch) == 1
    # arrival order is kept across batches
    assert [x for b in blocker.batches[1:] for x in b] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    f.close()


@pytest.mark.parametrize("cost_value, message", [
    (13, "input cost 13 exceeds max_batch_cost 12.0"),
    (-1, "invalid cost value: expected a finite number >= 0 (got -1)"),
    ("3", "invalid cost value: expected a finite number >= 0 (got '3')"),
    (float("nan"), "invalid cost value: expected a finite number >= 0 (got nan)"),
    (True, "invalid cost value: expected a finite number >= 0 (got True)"),
    (10**400, "invalid cost value: expected a finite number >= 0 (got 1" + "0" * 400 + ")"),
])
def test_bad_costs_are_refused_at_submit_and_nothing_is_queued(cost_value, message):
    seen = []
    f = batched_fn(lambda b: seen.extend(b) or b, cost=lambda x: cost_value, max_batch_cost=12)
    with pytest.raises(ValueError) as info:
        f("x")
    assert str(info.value) == message
    assert f.stats().submitted == 0 and seen == []
    f.close()


def test_an_exception_in_cost_goes_to_that_caller_and_nothing_is_queued():
    def cost(x):
        raise LookupError("no cost for you")

    f = batched_fn(lambda b: b, cost=cost, max_batch_cost=5)
    with pytest.raises(LookupError, match="no cost for you"):
        f.submit("x")
    assert f.stats().submitted == 0
    f.close()


def test_cost_and_max_batch_cost_go_together():
    with pytest.raises(ValueError, match="cost and max_batch_cost go together"):
        batched_fn(lambda b: b, cost=len)
    with pytest.raises(ValueError, match="cost and max_batch_cost go together"):
        batched_fn(lambda b: b, max_batch_cost=3)


def test_batch_info_reports_the_cost():
    infos: list[BatchInfo] = []
    f = batched_fn(lambda b: b, cost=len, max_batch_cost=100, on_batch=infos.append, max_delay=0)
    with f:
        f("abcd")
    assert infos[0].cost == 4


def test_numpy_and_other_real_numbers_are_costs():
    np = pytest.importorskip("numpy")
    from fractions import Fraction
    from decimal import Decimal
    costs = [np.int64(2), np.float32(2.0), np.uint8(3), Fraction(5, 2), Decimal("1.5"), 4]
    seen = []
    with batched_fn(lambda b: seen.append(list(b)) or b, cost=lambda x: costs[x], max_batch_cost=12,
                    on_batch=lambda info: seen.append(info.cost)) as f:
        assert [f(i) for i in range(len(costs))] == list(range(len(costs)))
    assert [c for c in seen if isinstance(c, float)] == [2.0, 2.0, 3.0, 2.5, 1.5, 4.0]
    for bad in (np.bool_(True), np.float64("nan"), np.int64(-2)):
        with batched_fn(lambda b: b, cost=lambda x, bad=bad: bad, max_batch_cost=12) as f:
            with pytest.raises(ValueError, match=re.escape(
                    f"invalid cost value: expected a finite number >= 0 (got {bad!r})")):
                f(0)
