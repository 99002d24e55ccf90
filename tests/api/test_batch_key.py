"""Keyed batches (GUIDE §12): batch_key= and max_keys=.

A held handler (``Hold``) pins the worker inside a batch so that what is
queued behind it is known exactly; the order and shape of the batches that
follow are then asserted exactly.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import HOLD, Hold, identity, run_script, stats_balance, wait_until
from _shared_tools import share_and_connect, unique_name
from batched_fn import Closed, Failed, Full, KeyStats, batched_fn


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def tag_key(x):
    """Inputs are (key, payload) pairs; HOLD gets a key of its own."""
    return "hold" if x is HOLD else x[0]


def key_of_pair(x):
    """A module-level key function: it can travel to a connected process."""
    if x == "bad":
        raise LookupError("no key for 'bad'")
    return x[0]


def echo_pairs(batch):
    return [(k, v * 10) for k, v in batch]


def assert_unmixed(batches, key=lambda x: x[0]):
    for batch in batches:
        assert len({key(x) for x in batch}) == 1, f"a batch mixed keys: {batch}"


def test_keys_never_share_a_batch_from_many_threads(rand):
    seen = []
    lock = threading.Lock()

    def handler(batch):
        with lock:
            seen.append(list(batch))
        time.sleep(rand.random() * 0.001)
        return echo_pairs(batch)

    keys = ["a", "b", "c", 7, ("t", 1)]
    f = batched_fn(handler, max_batch_size=8, max_delay=0.002, batch_key=tag_key)
    results: dict[int, list] = {}

    def caller(t):
        out = []
        for i in range(120):
            k = keys[(t + i) % len(keys)]
            out.append(f((k, t * 1000 + i)) == (k, (t * 1000 + i) * 10))
        results[t] = out

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(all(r) for r in results.values()) and len(results) == 8
    assert_unmixed(seen)
    assert sorted((repr(k), v) for b in seen for k, v in b) == sorted(
        (repr(keys[(t + i) % len(keys)]), t * 1000 + i) for t in range(8) for i in range(120))
    st = f.stats()
    assert st.completed == st.submitted == 960
    assert {k: v.submitted for k, v in st.by_key.items()} == {k: 192 for k in keys}
    assert {k: v.batched_items for k, v in st.by_key.items()} == {k: 192 for k in keys}
    assert sum(v.batches for v in st.by_key.values()) == st.batches == len(seen)
    assert all(v.queued == 0 for v in st.by_key.values())
    f.close()


def test_keys_never_share_a_batch_from_asyncio(run_async):
    seen = []
    f = batched_fn(lambda b: seen.append(list(b)) or echo_pairs(b), max_batch_size=16, max_delay=0.001,
                   batch_key=tag_key)

    async def main():
        return await asyncio.gather(*(f.acall((i % 3, i)) for i in range(1500)))

    assert run_async(main()) == [(i % 3, i * 10) for i in range(1500)]
    assert_unmixed(seen)
    assert {k: v.batched_items for k, v in f.stats().by_key.items()} == {0: 500, 1: 500, 2: 500}
    f.close()


def test_the_oldest_key_goes_first_and_a_key_takes_only_its_own_inputs():
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=8, max_delay=0, batch_key=tag_key)
    pinned = hold.pin(f)
    order = [("b", 1), ("a", 2), ("c", 3), ("a", 4), ("b", 5), ("c", 6), ("a", 7)]
    futures = [f.submit(x) for x in order]
    hold.release()
    assert [fut.result(10) for fut in futures] == order
    assert pinned.result(10) == HOLD
    # b's first input is the oldest, then a's, then c's; each batch in arrival order
    assert hold.batches[1:] == [[("b", 1), ("b", 5)], [("a", 2), ("a", 4), ("a", 7)], [("c", 3), ("c", 6)]]
    f.close()


def test_a_key_with_a_full_batch_goes_before_an_older_key():
    hold = Hold(identity)
    reasons = []
    f = batched_fn(hold, max_batch_size=3, max_delay=30, batch_key=tag_key,
                   on_batch=lambda info: reasons.append(info.reason))
    pins = [f.submit(HOLD) for _ in range(3)]     # a full batch: it goes at once and holds the worker
    assert hold.entered.wait(10)
    older = f.submit(("a", 0))
    full = [f.submit(("b", i)) for i in range(3)]
    hold.release()
    assert [fut.result(10) for fut in full] == [("b", 0), ("b", 1), ("b", 2)]
    # a's single input waits for its own 30 s delay: still queued, not mixed into b's batch
    assert not older.done()
    assert f.stats().by_key["a"].queued == 1
    f.close()      # close dispatches what is left
    assert older.result(10) == ("a", 0)
    assert hold.batches[1:] == [[("b", 0), ("b", 1), ("b", 2)], [("a", 0)]]
    assert reasons == ["full", "full", "close"]
    assert [p.result(10) for p in pins] == [HOLD] * 3


def test_a_full_key_goes_at_once_while_another_key_waits_its_delay():
    seen = []
    f = batched_fn(lambda b: seen.append(list(b)) or list(b), max_batch_size=4, max_delay=30, batch_key=tag_key)
    waiting = f.submit(("slow", 0))
    futures = [f.submit(("busy", i)) for i in range(8)]
    assert [fut.result(10) for fut in futures] == [("busy", i) for i in range(8)]
    assert not waiting.done()
    assert seen == [[("busy", 0), ("busy", 1), ("busy", 2), ("busy", 3)],
                    [("busy", 4), ("busy", 5), ("busy", 6), ("busy", 7)]]
    f.close()
    assert waiting.result(10) == ("slow", 0)


def test_each_key_waits_max_delay_from_its_own_first_input():
    infos = []
    delay = 0.3
    f = batched_fn(identity, max_batch_size=100, max_delay=delay, batch_key=tag_key, on_batch=infos.append)
    f.start()
    first = f.submit(("a", 1))
    time.sleep(delay / 2)
    second = f.submit(("b", 2))
    assert first.result(10) == ("a", 1) and second.result(10) == ("b", 2)
    wait_until(lambda: len(infos) == 2, what="on_batch for both batches")   # it runs after the outputs
    assert [i.size for i in infos] == [1, 1]
    # b's batch did not leave with a's timer: it waited its own full delay
    # (a lower bound: a slow machine only makes the waits longer)
    assert all(i.oldest_wait >= delay * 0.95 for i in infos), [i.oldest_wait for i in infos]
    assert [i.reason for i in infos] == ["delay", "delay"]
    f.close()


def test_backlogged_keys_fill_their_batches_as_one_key_does():
    """K keys evenly loaded from a backlog: every key's batches are as full as a lone key's."""
    def mean_sizes(num_keys):
        hold = Hold(identity)
        f = batched_fn(hold, max_batch_size=8, max_delay=0, batch_key=tag_key)
        hold.pin(f)
        futures = [f.submit((i % num_keys, i)) for i in range(8 * 5 * num_keys)]   # 5 batches' worth per key
        hold.release()
        for fut in futures:
            fut.result(10)
        by_key = f.stats().by_key
        f.close()
        assert_unmixed(hold.batches[1:])
        return {k: v.mean_batch_size for k, v in by_key.items() if k != "hold"}

    one = mean_sizes(1)
    many = mean_sizes(4)
    assert one == {0: 8.0}
    assert many == {0: 8.0, 1: 8.0, 2: 8.0, 3: 8.0}


def test_too_many_live_keys_raise_full_and_idle_keys_are_forgotten(run_async):
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=8, max_delay=0, batch_key=tag_key, max_keys=2, on_full="block")
    hold.pin(f)            # "hold" is in a batch: not a live key any more
    a = f.submit(("a", 1))
    b = f.submit(("b", 1))
    message = "^" + re.escape("too many batch keys: 2 keys have requests queued (max_keys=2); key 'c' refused") + "$"
    with pytest.raises(Full, match=message) as info:
        f.submit(("c", 1))
    assert info.value.queued == 2
    with pytest.raises(Full, match=message):
        f(("c", 1), timeout=5)           # on_full="block" does not wait for a key

    async def refused():
        with pytest.raises(Full, match=message):
            await f.acall(("c", 1), timeout=5)
    run_async(refused())
    again = f.submit(("a", 2))           # a live key takes more inputs
    st = f.stats()
    assert st.rejected == 3 and st.submitted == 4 and st.queued == 3
    hold.release()
    assert [x.result(10) for x in (a, b, again)] == [("a", 1), ("b", 1), ("a", 2)]
    wait_until(lambda: f.stats().running == 0)
    assert f(("c", 1)) == ("c", 1) and f(("d", 1)) == ("d", 1)   # a and b were forgotten
    assert f._chan.live_keys == 0
    f.close()


def test_a_raising_key_function_fails_that_call_only(run_async):
    def key(x):
        if x == "bad":
            raise LookupError("no key for 'bad'")
        return len(x)

    seen = []
    f = batched_fn(lambda b: seen.append(list(b)) or [s.upper() for s in b], max_delay=0.001, batch_key=key)
    with pytest.raises(LookupError, match="no key for 'bad'"):
        f("bad")
    with pytest.raises(LookupError, match="no key for 'bad'"):
        f.submit("bad")                  # raised at submit, not through the future

    async def main():
        with pytest.raises(LookupError, match="no key for 'bad'"):
            await f.acall("bad")
        return await asyncio.gather(f.acall("xy"), f.acall("z"))
    assert run_async(main()) == ["XY", "Z"]
    assert f("ok") == "OK"
    st = f.stats()
    assert st.submitted == 3 and st.completed == 3 and st.failed == 0
    assert "bad" not in [x for b in seen for x in b]
    f.close()


@pytest.mark.parametrize("bad_key, type_name", [([1], "list"), ({"a": 1}, "dict"), ({1}, "set")])
def test_an_unhashable_key_raises_type_error_naming_its_type(bad_key, type_name):
    f = batched_fn(identity, batch_key=lambda x: bad_key)
    message = f"^invalid batch key: batch_key returned an unhashable '{type_name}'"
    with pytest.raises(TypeError, match=message):
        f(1)
    with pytest.raises(TypeError, match=message):
        f.submit(1)
    assert f.stats().submitted == 0
    f.close()


def test_bad_batch_key_knobs_are_refused():
    with pytest.raises(TypeError, match=re.escape("invalid batch_key value: expected a callable of one input "
                                                  "returning a hashable key (got 3)")):
        batched_fn(identity, batch_key=3)
    with pytest.raises(ValueError, match=re.escape("max_keys goes with batch_key (got max_keys=4 and no batch_key)")):
        batched_fn(identity, max_keys=4)
    with pytest.raises(ValueError, match=re.escape("invalid max_keys value: expected an int between 1 and")):
        batched_fn(identity, batch_key=tag_key, max_keys=0)
    with pytest.raises(TypeError, match=re.escape("invalid max_keys value")):
        batched_fn(identity, batch_key=tag_key, max_keys=2.5)


def test_cost_bounds_hold_per_key():
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=10, max_delay=0, batch_key=tag_key,
                   cost=lambda x: 0 if x is HOLD else x[1], max_batch_cost=10)
    hold.pin(f)
    inputs = [("a", 4), ("b", 9), ("a", 4), ("b", 1), ("a", 4), ("b", 2), ("a", 1)]
    futures = [f.submit(x) for x in inputs]
    hold.release()
    assert [fut.result(10) for fut in futures] == inputs
    batches = hold.batches[1:]
    assert_unmixed(batches)
    assert all(sum(v for _, v in b) <= 10 for b in batches)
    # a's inputs: 4+4 fill the budget (a full batch goes first), then 4+1
    assert batches == [[("a", 4), ("a", 4)], [("b", 9), ("b", 1)], [("a", 4), ("a", 1)], [("b", 2)]]
    f.close()


def test_failed_items_timeouts_and_errors_stay_within_their_call():
    def handler(batch):
        if batch[0][0] == "boom":
            raise RuntimeError("boom batch")
        return [Failed(ValueError(f"bad {v}")) if v < 0 else (k, v) for k, v in batch]

    f = batched_fn(handler, max_batch_size=8, max_delay=0.01, batch_key=tag_key)
    good, failed, boom = f.submit(("a", 1)), f.submit(("a", -1)), f.submit(("boom", 0))
    assert good.result(10) == ("a", 1)
    with pytest.raises(ValueError, match="bad -1"):
        failed.result(10)
    with pytest.raises(RuntimeError, match="boom batch"):
        boom.result(10)
    f.close()
    assert stats_balance(f.stats()) == 0


def test_a_timeout_fires_for_a_key_waiting_its_delay_while_others_run():
    f = batched_fn(identity, max_batch_size=2, max_delay=30, batch_key=tag_key)
    late = f.submit(("slow", 0), timeout=0.05)
    with pytest.raises(TimeoutError):
        late.result(10)
    pair = [f.submit(("fast", 1)), f.submit(("fast", 2))]
    assert [p.result(10) for p in pair] == [("fast", 1), ("fast", 2)]
    st = f.stats()
    assert st.timed_out == 1 and st.by_key["slow"].queued == 0
    f.close()
    assert f._chan.live_keys == 0


def test_drop_oldest_evicts_the_oldest_input_of_any_key():
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=8, max_delay=0, batch_key=tag_key, channel_cap=3, on_full="drop_oldest")
    hold.pin(f)
    first = f.submit(("a", 1))
    rest = [f.submit(("b", 2)), f.submit(("a", 3))]
    wait_until(lambda: f.stats().queued == 3)
    newest = f.submit(("c", 4))          # the queue is full: ("a", 1) goes
    with pytest.raises(Full, match="evicted"):
        first.result(10)
    hold.release()
    assert [x.result(10) for x in rest + [newest]] == [("b", 2), ("a", 3), ("c", 4)]
    assert_unmixed(hold.batches[1:])
    wait_until(lambda: f.stats().running == 0)
    assert f._chan.live_keys == 0
    f.close()


def test_auto_delay_with_keys():
    seen = []
    f = batched_fn(lambda b: seen.append(list(b)) or echo_pairs(b), max_batch_size=8, max_delay="auto",
                   batch_key=tag_key)
    results = []

    def caller(t):
        results.append([f((t % 3, i)) for i in range(100)])

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted([[(t % 3, i * 10) for i in range(100)] for t in range(6)])
    assert_unmixed(seen)
    f.close()


def test_two_workers_never_mix_keys():
    seen = []
    lock = threading.Lock()

    def handler(batch):
        with lock:
            seen.append(list(batch))
        time.sleep(0.002)
        return echo_pairs(batch)

    f = batched_fn(handler, max_batch_size=4, max_delay=0.001, batch_key=tag_key, num_workers=2)
    futures = [f.submit((i % 5, i)) for i in range(600)]
    assert [fut.result(30) for fut in futures] == [(i % 5, i * 10) for i in range(600)]
    assert_unmixed(seen)
    st = f.stats()
    assert st.completed == 600 and {k: v.batched_items for k, v in st.by_key.items()} == {k: 120 for k in range(5)}
    f.close()


def test_a_failed_context_fails_every_keyed_request_queued():
    gate = threading.Event()

    def factory():
        gate.wait(10)
        raise OSError("no model")

    f = batched_fn(identity, batch_key=tag_key, max_delay=0, context={"model": factory})
    futures = [f.submit((i % 3, i)) for i in range(9)]
    gate.set()
    for fut in futures:
        with pytest.raises(Closed, match="no model"):
            fut.result(10)
    assert f._chan.live_keys == 0
    f.close()


def test_stats_by_key_counts_each_key():
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=2, max_delay=0, batch_key=tag_key)
    hold.pin(f)
    futures = [f.submit(("x", i)) for i in range(5)] + [f.submit(("y", 0))]
    st = f.stats()
    assert st.by_key["x"] == KeyStats(submitted=5, batches=0, batched_items=0, queued=5, mean_batch_size=0.0)
    assert st.by_key["y"].queued == 1
    hold.release()
    for fut in futures:
        fut.result(10)
    st = f.stats()
    assert st.by_key["x"] == KeyStats(submitted=5, batches=3, batched_items=5, queued=0, mean_batch_size=5 / 3)
    assert st.by_key["y"] == KeyStats(submitted=1, batches=1, batched_items=1, queued=0, mean_batch_size=1.0)
    assert f.stats().by_key["hold"].batches == 1
    plain = batched_fn(identity)
    assert plain.stats().by_key == {}
    plain.close()
    f.close()


# ---------------------------------------------------------------- across processes

@pytest.fixture
def shared():
    made = []

    def build(handler, **knobs):
        fn, _, remote = share_and_connect(handler, **knobs)
        made.append((fn, remote))
        return fn, remote

    yield build
    for fn, remote in made:
        remote.close()
        fn.close(timeout=5)


def test_remote_callers_keys_never_mix(shared, run_async):
    seen = []
    fn, remote = shared(lambda b: seen.append(list(b)) or echo_pairs(b), max_batch_size=8, max_delay=0.002,
                        batch_key=key_of_pair)
    with pytest.raises(LookupError, match="no key for 'bad'"):
        remote("bad")
    with pytest.raises(LookupError, match="no key for 'bad'"):
        remote.submit("bad").result(10)   # computed in the model process: through the future

    out = []

    def caller(t):
        out.append([remote((f"k{t % 3}", i)) for i in range(50)])

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 6

    async def main():
        return await asyncio.gather(*(remote.acall(("async", i)) for i in range(40)))
    assert run_async(main()) == [("async", i * 10) for i in range(40)]
    assert_unmixed(seen)
    by_key = fn.stats().by_key
    assert {k: v.batched_items for k, v in by_key.items() if k != "async"} == {"k0": 100, "k1": 100, "k2": 100}
    assert fn.stats().submitted == 340


def test_remote_with_a_lambda_key_function(shared):
    seen = []
    fn, remote = shared(lambda b: seen.append(list(b)) or list(b), max_batch_size=8, max_delay=0.002,
                        batch_key=lambda x: x % 2)
    futures = [remote.submit(i) for i in range(200)]
    assert [fut.result(10) for fut in futures] == list(range(200))
    assert_unmixed(seen, key=lambda x: x % 2)
    with pytest.raises(TypeError, match="^invalid batch key"):
        fn2, remote2 = shared(identity, batch_key=lambda x: [x])
        remote2(1)


def test_on_full_block_waits_for_room_with_keys(run_async):
    hold = Hold(identity)
    f = batched_fn(hold, max_batch_size=8, max_delay=0, batch_key=tag_key, channel_cap=2, on_full="block")
    hold.pin(f)
    queued = [f.submit(("a", 1)), f.submit(("b", 2))]
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(f(("a", 3), timeout=10)))
    waiter.start()

    async def blocked():
        return await f.acall(("c", 4), timeout=10)

    time.sleep(0.05)
    assert waiter.is_alive()           # no room: it waits instead of Full
    hold.release()
    assert run_async(blocked()) == ("c", 4)
    waiter.join(10)
    assert waiter_result == [("a", 3)] and [q.result(10) for q in queued] == [("a", 1), ("b", 2)]
    assert_unmixed(hold.batches[1:])
    f.close()


# ---------------------------------------------------------------- the scheduler against a model of it

def expected_batches(items, max_size, max_cost):
    """The batches the keyed collector forms from a backlog of (key, cost) items, all queued at once."""
    queues: dict = {}
    for i, (key, cost) in enumerate(items):
        queues.setdefault(key, []).append((i, key, cost))
    out = []
    while any(queues.values()):
        live = [q for q in queues.values() if q]

        def full(q):
            return len(q) >= max_size or (max_cost is not None and sum(c for _, _, c in q) > max_cost)
        pool = [q for q in live if full(q)] or live
        q = min(pool, key=lambda q: q[0][0])        # the oldest first input
        batch, total = [], 0
        while q and len(batch) < max_size:
            if max_cost is not None and batch and total + q[0][2] > max_cost:
                break
            total += q[0][2]
            batch.append(q.pop(0))
        out.append([(i, k, c) for i, k, c in batch])
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=30),
       max_size=st.integers(1, 6), max_cost=st.one_of(st.none(), st.integers(5, 12)))
def test_a_backlog_is_batched_exactly_as_the_model_says(items, max_size, max_cost):
    hold = Hold(identity)
    knobs = {} if max_cost is None else dict(cost=lambda x: 0 if x is HOLD else x[2], max_batch_cost=max_cost)
    f = batched_fn(hold, max_batch_size=max_size, max_delay=0, batch_key=lambda x: "hold" if x is HOLD else x[1],
                   **knobs)
    try:
        hold.pin(f)
        futures = [f.submit((i, key, cost)) for i, (key, cost) in enumerate(items)]
        hold.release()
        assert [fut.result(10) for fut in futures] == [(i, k, c) for i, (k, c) in enumerate(items)]
        assert hold.batches[1:] == expected_batches(items, max_size, max_cost)
        by_key = f.stats().by_key
        for key in {k for k, _ in items}:
            assert by_key[key].submitted == by_key[key].batched_items == sum(1 for k, _ in items if k == key)
            assert by_key[key].queued == 0
    finally:
        f.close()


def test_a_caller_in_another_process_gets_keyed_batches():
    seen = []
    fn = batched_fn(lambda b: seen.append(list(b)) or echo_pairs(b), max_batch_size=8, max_delay=0.005,
                    batch_key=key_of_pair)
    name = unique_name()
    fn.share(name)
    try:
        proc = run_script(f"""
            import sys
            sys.path.insert(0, {TESTS_DIR!r})
            from batched_fn import connect
            remote = connect({name!r}, timeout=10)
            try:
                remote.submit("bad").result(10)   # the model process runs the key function
            except LookupError as exc:
                print("raised:", exc)
            futures = [remote.submit((f"k{{i % 3}}", i)) for i in range(60)]
            print(sorted(f.result(10)[1] for f in futures) == [i * 10 for i in range(60)])
            remote.close()
        """)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["raised: no key for 'bad'", "True"], proc.stdout
        assert_unmixed(seen)
        assert {k: v.batched_items for k, v in fn.stats().by_key.items()} == {"k0": 20, "k1": 20, "k2": 20}
    finally:
        fn.close()


def test_a_key_closes_its_batch_early_to_meet_a_deadline():
    reasons = {}

    def handler(batch):
        time.sleep(0.4)
        return list(batch)

    f = batched_fn(handler, max_batch_size=8, max_delay=30, batch_key=tag_key,
                   on_batch=lambda info: reasons.setdefault(len(reasons), info.reason))
    for _ in range(2):                       # teach it the handler's time: full batches of "t"
        assert [x.result(10) for x in [f.submit(("t", i)) for i in range(8)]] == [("t", i) for i in range(8)]
    other = f.submit(("other", 0))           # no deadline: waits its 30 s delay
    due = f.submit(("d", 1), timeout=2.0)    # closed early, about 0.5 s before its deadline
    assert due.result(10) == ("d", 1)
    # on_batch runs in the worker after the batch's callers are woken: wait for it
    wait_until(lambda: len(reasons) > 2, 5, "the third batch's listener")
    assert reasons[2] == "deadline" and not other.done()
    f.close()
    assert other.result(10) == ("other", 0)


def test_many_distinct_keys_over_time_keep_memory_bounded():
    f = batched_fn(identity, max_batch_size=4, max_delay=0, batch_key=lambda x: x, max_keys=16)
    assert [f(i) for i in range(500)] == list(range(500))     # every key forgotten once served
    accepted, refused = [], 0
    for i in range(500, 1000):           # a burst: at most 16 keys wait at once, the rest are refused
        try:
            accepted.append((i, f.submit(i)))
        except Full:
            refused += 1
        assert f._chan.live_keys <= 16
    assert all(fut.result(10) == i for i, fut in accepted)
    assert refused + len(accepted) == 500 and f.stats().rejected == refused
    by_key = f.stats().by_key
    assert len(by_key) == 16             # counters of the 16 keys used last
    assert f._chan.live_keys == 0 and f.stats().queued == 0
    f.close()
