"""Property: every request gets exactly one outcome, and it is its own.

Hypothesis draws the knobs, the clients (threads doing blocking calls or
futures, an asyncio loop), per-request timeouts, cancellations, handler faults
and the moment of close().  Afterwards every request must have exactly one
outcome consistent with what the handler saw, batches respect their bounds
and arrival order, and stats() adds up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from batched_fn import BatchedFnError, Closed, Failed, Full, batched_fn

FAULTS = ("none", "raise", "base", "failed", "short")


@dataclass(frozen=True)
class Item:
    id: int
    client: int
    fault: str


@dataclass
class Op:
    fault: str
    timeout: float | None
    cancel: bool
    pause: float


@dataclass
class Batch:
    ids: list[int]
    error: Any = None                      # the batch's exception or "short"
    item_errors: dict[int, BaseException] = field(default_factory=dict)


op_st = st.builds(
    Op,
    fault=st.sampled_from(FAULTS + ("none",) * 4),   # mostly healthy requests
    timeout=st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.0005, 0.003, 5.0])),
    cancel=st.booleans(),
    pause=st.sampled_from([0.0, 0.0, 0.0002, 0.001]),
)

scenario_st = st.fixed_dictionaries({
    "max_batch_size": st.integers(1, 6),
    "max_delay": st.sampled_from([0.0, 0.0005, 0.002]),
    "num_workers": st.integers(1, 3),
    "channel_cap": st.one_of(st.none(), st.integers(2, 12)),
    "on_full": st.sampled_from(["reject", "drop_oldest"]),
    "handler_sleep": st.sampled_from([0.0, 0.0, 0.0005]),
    "clients": st.lists(st.tuples(st.sampled_from(["call", "submit", "acall"]),
                                  st.lists(op_st, min_size=1, max_size=12)), min_size=1, max_size=4),
    "close_after": st.one_of(st.none(), st.sampled_from([0.0, 0.001, 0.003, 0.01])),
})


def _handler(log: list[Batch], lock: threading.Lock, sleep: float):
    def handler(batch: list[Item]) -> Any:
        rec = Batch([it.id for it in batch])
        with lock:
            log.append(rec)
        if sleep:
            time.sleep(sleep)
        faults = {it.fault for it in batch}
        if "raise" in faults:
            rec.error = ValueError(f"batch of {rec.ids}")
            raise rec.error
        if "base" in faults:
            rec.error = KeyboardInterrupt()
            raise rec.error
        if "short" in faults:
            rec.error = "short"
            return [it.id for it in batch][:-1]
        out = []
        for it in batch:
            if it.fault == "failed":
                rec.item_errors[it.id] = LookupError(it.id)
                out.append(Failed(rec.item_errors[it.id]))
            else:
                out.append(("out", it.id))
        return out
    return handler


def _run_sync_client(fn: Any, kind: str, items: list[tuple[Item, Op]], record: Any) -> None:
    pending = []
    for item, op in items:
        try:
            if kind == "call":
                record(item.id, "value", fn(item, timeout=op.timeout))
            else:
                fut = fn.submit(item, timeout=op.timeout)
                if op.cancel:
                    fut.cancel()
                pending.append((item, fut))
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
            record(item.id, "error", exc)
        if op.pause:
            time.sleep(op.pause)
    for item, fut in pending:
        try:
            record(item.id, "value", fut.result(15))
        except concurrent.futures.CancelledError:
            record(item.id, "cancelled", None)
        except concurrent.futures.TimeoutError as exc:
            if fut.done():
                record(item.id, "error", exc)   # the request's own TimeoutError
            else:
                record(item.id, "hung", None)
        except BaseException as exc:  # noqa: BLE001
            record(item.id, "error", exc)


def _run_async_client(fn: Any, items: list[tuple[Item, Op]], record: Any) -> None:
    async def one(item: Item, op: Op) -> None:
        try:
            record(item.id, "value", await fn.acall(item, timeout=op.timeout))
        except asyncio.CancelledError:
            record(item.id, "cancelled", None)
        except BaseException as exc:  # noqa: BLE001
            record(item.id, "error", exc)

    async def main() -> None:
        tasks = []
        for item, op in items:
            task = asyncio.ensure_future(one(item, op))
            tasks.append(task)
            await asyncio.sleep(op.pause)
            if op.cancel:
                task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=15)
        for task in pending:
            task.cancel()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario_st)
def test_every_request_gets_exactly_one_outcome_of_its_own(sc: dict[str, Any]) -> None:
    log: list[Batch] = []
    lock = threading.Lock()
    outcomes: dict[int, list[tuple[str, Any]]] = {}

    def record(rid: int, kind: str, value: Any) -> None:
        with lock:
            outcomes.setdefault(rid, []).append((kind, value))

    fn = batched_fn(_handler(log, lock, sc["handler_sleep"]), max_batch_size=sc["max_batch_size"],
                    max_delay=sc["max_delay"], num_workers=sc["num_workers"],
                    channel_cap=sc["channel_cap"], on_full=sc["on_full"])
    plans = []
    next_id = 0
    for c, (kind, ops) in enumerate(sc["clients"]):
        items = []
        for op in ops:
            items.append((Item(next_id, c, op.fault), op))
            next_id += 1
        plans.append((kind, items))
    threads = [threading.Thread(target=_run_async_client, args=(fn, items, record)) if kind == "acall"
               else threading.Thread(target=_run_sync_client, args=(fn, kind, items, record))
               for kind, items in plans]
    closing = threading.Event()

    def closer() -> None:
        time.sleep(sc["close_after"])
        closing.set()
        fn.close(timeout=10)

    if sc["close_after"] is not None:
        threads.append(threading.Thread(target=closer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    closing.set()
    fn.close(timeout=10)

    # ---- what the handler saw
    where: dict[int, Batch] = {}
    for rec in log:
        assert 1 <= len(rec.ids) <= sc["max_batch_size"]
        for rid in rec.ids:
            assert rid not in where, f"request {rid} ran in two batches"
            where[rid] = rec
        order: dict[int, int] = {}
        for rid in rec.ids:   # arrival order: one client's requests stay in its order
            client = _client_of(plans, rid)
            assert order.get(client, -1) < rid, f"batch {rec.ids} is out of arrival order"
            order[client] = rid

    # ---- what each caller got
    counts = {"full": 0, "timeout": 0, "closed": 0, "cancelled": 0}
    late: set[int] = set()   # timed out inside their running batch (timeout= bounds the whole call)
    for rid in range(next_id):
        got = outcomes.get(rid, [])
        assert len(got) == 1, f"request {rid} got {len(got)} outcomes: {got}"
        kind, value = got[0]
        assert kind != "hung", f"request {rid} never got an outcome"
        rec = where.get(rid)
        if kind == "cancelled":
            counts["cancelled"] += 1
        elif kind == "value":
            assert value == ("out", rid), f"request {rid} got {value!r}: mis-routed"
            assert rec is not None and rec.error is None and rid not in rec.item_errors
        elif isinstance(value, TimeoutError) and "batch did not finish" in str(value):
            assert rec is not None, f"request {rid} got {value!r} without running"
            counts["timeout"] += 1
            late.add(rid)
        elif isinstance(value, (TimeoutError, Full, Closed)):
            assert rec is None, f"request {rid} ran in a batch but got {value!r}"
            key = "timeout" if isinstance(value, TimeoutError) else (
                "full" if isinstance(value, Full) else "closed")
            counts[key] += 1
            if key == "closed":
                assert closing.is_set(), "Closed before close()"
        else:
            assert rec is not None, f"request {rid} got {value!r} without running"
            if rid in rec.item_errors:
                assert value is rec.item_errors[rid]
            elif rec.error == "short":
                assert isinstance(value, BatchedFnError) and "outputs" in str(value)
            elif isinstance(rec.error, KeyboardInterrupt):
                assert isinstance(value, BatchedFnError) and value.__cause__ is rec.error
            else:
                # the first caller gets the very object, the others a copy of their own
                assert value is rec.error or (type(value) is type(rec.error) and value.args == rec.error.args), \
                    f"request {rid} got {value!r}, its batch raised {rec.error!r}"

    # ---- stats() adds up
    s = fn.stats()
    ran = [rid for rec in log for rid in rec.ids if rid not in late]   # a late output is dropped
    ok_slots = sum(1 for rec in log if rec.error is None for rid in rec.ids
                   if rid not in rec.item_errors and rid not in late)
    assert s.late == len(late) and s.timed_out == s.late + s.expired, s
    assert s.queued == 0 and s.running == 0
    assert s.submitted == s.completed + s.failed + s.timed_out + s.cancelled, s
    assert s.submitted + s.rejected + counts["closed"] == next_id, s
    assert s.batches == len(log) == sum(s.batches_by_reason.values())
    assert s.completed == ok_slots, s
    evicted = s.failed - (len(ran) - ok_slots)
    assert evicted >= 0, s
    if sc["on_full"] == "reject":
        assert evicted == 0 and s.rejected == counts["full"], s
    else:
        assert counts["full"] <= s.rejected + evicted, s
    assert counts["timeout"] <= s.timed_out
    assert s.timed_out + s.cancelled <= counts["timeout"] + counts["cancelled"], s


def _client_of(plans: list[tuple[str, list[tuple[Item, Op]]]], rid: int) -> int:
    for kind, items in plans:
        for item, _ in items:
            if item.id == rid:
                return item.client
    raise KeyError(rid)
