"""Free-threading stress tests: callers truly in parallel (run on any build).

On a free-threaded interpreter (3.13t, 3.14t) with the GIL off, threads and
event loops call one batched function at the same time as its worker, the
deadline thread and close(); on a regular build the same tests run with the
GIL's switching.  Every round checks exact outcomes (each caller gets its own
result, or its own Failed error) and counters that add up to what the callers
and the handler saw.  Also: the GIL stays off after import, and a process
that used the package exits with nothing on stderr.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError as FutureCancelled
from dataclasses import dataclass, field
from typing import Any

import pytest

from batched_fn import Closed, Failed, Full, batched_fn
from conftest import FREE_THREADED, GIL_FORCED
from helpers import PACKAGE_DIR

ROUNDS = int(os.environ.get("FT_STRESS_ROUNDS", "6"))


def _failing(x: int) -> bool:
    return x % 7 == 0


class Handler:
    """Doubles each input, fails every 7th with its own ValueError; records every input it ran."""

    def __init__(self, seed: int) -> None:
        self.handled: list[int] = []
        self.lock = threading.Lock()
        self.rand = random.Random(seed)

    def __call__(self, batch: list[int]) -> list[Any]:
        with self.lock:
            self.handled.extend(batch)
            pause = self.rand.random() < 0.05
        if pause:
            time.sleep(0.0005)   # now and then a slow batch, so the queue fills
        return [Failed(ValueError(x)) if _failing(x) else 2 * x for x in batch]


@dataclass
class Outcomes:
    """What the callers saw, keyed by input (each input is called exactly once)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)     # the caller gave up (CancelledError)
    started: set[int] = field(default_factory=set)       # cancel candidates whose call began

    def record(self, x: int, result: Any = None, error: BaseException | None = None) -> None:
        with self.lock:
            assert x not in self.results and x not in self.errors, f"two outcomes for {x}"
            if error is None:
                self.results[x] = result
            else:
                self.errors[x] = error


def _kind(err: BaseException) -> str:
    if isinstance(err, Full):
        return "evicted" if "evicted" in str(err) else "rejected"
    if isinstance(err, TimeoutError):
        if "not taken into a batch" in str(err):
            return "timeout"      # expired while queued (or by the estimate, before its batch)
        if "did not finish" in str(err):
            return "late"         # its deadline came while its batch ran
        return "no_room"
    if isinstance(err, Closed):
        return "closed"
    if isinstance(err, ValueError):
        return "failed"
    return "other"


def _thread_caller(f: Any, xs: list[int], out: Outcomes, seed: int, cancels: bool) -> None:
    rand = random.Random(seed)
    for x in xs:
        style = rand.random()
        timeout = None if _failing(x) or rand.random() < 0.5 else rand.choice((1e-5, 0.5))
        try:
            if style < 0.6:
                out.record(x, f(x, timeout=timeout))
            else:
                cancel = cancels and timeout is None and rand.random() < 0.3
                if cancel:
                    with out.lock:
                        out.started.add(x)
                fut = f.submit(x, timeout=None if cancel else timeout)
                if cancel and fut.cancel():
                    with out.lock:
                        out.cancelled.add(x)
                    continue
                try:
                    out.record(x, fut.result(timeout=30))
                except FutureCancelled:
                    raise AssertionError(f"future of {x} cancelled though nobody cancelled it")
        except Exception as exc:     # noqa: BLE001 - every kind is checked below
            out.record(x, error=exc)


async def _loop_caller(f: Any, xs: list[int], out: Outcomes, seed: int, cancels: bool) -> None:
    rand = random.Random(seed)

    async def one(x: int, timeout: float | None, candidate: bool) -> None:
        if candidate:
            with out.lock:
                out.started.add(x)
        try:
            out.record(x, await f.acall(x, timeout=timeout))
        except asyncio.CancelledError:
            with out.lock:
                out.cancelled.add(x)
        except Exception as exc:     # noqa: BLE001
            out.record(x, error=exc)

    tasks = []
    for x in xs:
        candidate = cancels and not _failing(x) and rand.random() < 0.2
        timeout = None if candidate or _failing(x) or rand.random() < 0.5 else rand.choice((1e-5, 0.5))
        task = asyncio.ensure_future(one(x, timeout, candidate))
        tasks.append((task, candidate))
        if rand.random() < 0.3:
            await asyncio.sleep(0)
    for task, candidate in tasks:
        if candidate:
            await asyncio.sleep(0)     # let it submit first
            task.cancel()
    await asyncio.wait_for(asyncio.gather(*(t for t, _ in tasks), return_exceptions=True), 60)


def _run_round(seed: int, *, on_full: str, threads: int, loops: int, per_caller: int, close_early: bool,
               num_workers: int = 1, max_delay: Any = 0.0005) -> None:
    rand = random.Random(seed)
    handler = Handler(seed)
    cancels = on_full == "reject"       # see the cancelled count below
    f = batched_fn(handler, max_batch_size=16, max_delay=max_delay, channel_cap=64, on_full=on_full,
                   num_workers=num_workers)
    out = Outcomes()
    inputs = list(range(1, 1 + (threads + loops) * per_caller))
    rand.shuffle(inputs)
    chunks = [inputs[i::threads + loops] for i in range(threads + loops)]
    workers = [threading.Thread(target=_thread_caller, args=(f, chunks[i], out, seed + i, cancels))
               for i in range(threads)]
    workers += [threading.Thread(target=asyncio.run, args=(_loop_caller(f, chunks[threads + i], out,
                                                                       seed + 1000 + i, cancels),))
                for i in range(loops)]
    for w in workers:
        w.start()
    if close_early:
        time.sleep(rand.uniform(0.0, 0.01))
        f.close()     # races with every caller: each gets its outcome or Closed
    for w in workers:
        w.join(60)
        assert not w.is_alive(), f"a caller hung (seed={seed})"
    f.close()
    _check_round(f, handler, out, inputs, on_full, seed)


def _check_round(f: Any, handler: Handler, out: Outcomes, inputs: list[int], on_full: str, seed: int) -> None:
    ctx = f"seed={seed} on_full={on_full}"
    handled = handler.handled
    assert len(handled) == len(set(handled)), f"an input reached the handler twice ({ctx})"
    handled_set = set(handled)
    assert handled_set <= set(inputs)
    # every caller has exactly one outcome (or gave up)
    seen = set(out.results) | set(out.errors) | out.cancelled
    assert seen == set(inputs), f"{len(set(inputs) - seen)} callers without an outcome ({ctx})"
    # each result is the caller's own, each Failed error the caller's own
    for x, result in out.results.items():
        assert result == 2 * x and not _failing(x) and x in handled_set, (x, result, ctx)
    kinds: dict[str, int] = {}
    for x, err in out.errors.items():
        kind = _kind(err)
        kinds[kind] = kinds.get(kind, 0) + 1
        assert kind != "other", (x, repr(err), ctx)
        if kind == "failed":
            assert err.args == (x,) and _failing(x) and x in handled_set, (x, repr(err), ctx)
        elif kind in ("rejected", "no_room", "closed", "timeout", "evicted"):
            assert x not in handled_set, (x, kind, ctx)     # never ran
        elif kind == "late":
            assert x in handled_set, (x, kind, ctx)         # its batch ran; the output was dropped
    if on_full != "drop_oldest":
        assert "evicted" not in kinds
    if on_full != "block":
        assert "no_room" not in kinds
    # counters add up exactly to what the handler and the callers saw
    s = f.stats()
    late = {x for x, err in out.errors.items() if _kind(err) == "late"}
    done_ok = sum(1 for x in handled if not _failing(x) and x not in late)
    assert s.completed == done_ok, (s, ctx)
    assert s.failed == len(handled) - len(late) - done_ok + kinds.get("evicted", 0), (s, kinds, ctx)
    assert s.rejected == kinds.get("rejected", 0), (s, kinds, ctx)
    assert s.timed_out == kinds.get("timeout", 0) + len(late), (s, kinds, ctx)
    assert (s.late, s.expired) == (len(late), kinds.get("timeout", 0)), (s, kinds, ctx)
    assert (s.queued, s.running) == (0, 0), (s, ctx)
    assert s.submitted == s.completed + s.failed + s.timed_out + s.cancelled, (s, ctx)
    # a caller that gave up was withdrawn (counted cancelled) unless a batch had it already
    withdrawn = {x for x in out.cancelled if x not in handled_set and x in out.started}
    never_submitted = out.cancelled - out.started
    assert not never_submitted, (sorted(never_submitted)[:5], ctx)
    assert s.cancelled == len(withdrawn), (s, len(withdrawn), ctx)
    # a cancel before the call was admitted (Closed, Full at submission) leaves no count either
    assert s.submitted == len(handled) + kinds.get("timeout", 0) + kinds.get("evicted", 0) + s.cancelled, (s, ctx)


@pytest.mark.parametrize("on_full", ["reject", "drop_oldest", "block"])
def test_threads_and_event_loops_at_once_exact_outcomes_and_counters(on_full: str) -> None:
    base = random.randrange(1 << 20)
    for r in range(ROUNDS):
        _run_round(base + r, on_full=on_full, threads=12, loops=3, per_caller=60, close_early=False,
                   num_workers=1 + r % 2, max_delay="auto" if r % 3 == 2 else 0.0005)


@pytest.mark.parametrize("on_full", ["reject", "drop_oldest", "block"])
def test_close_racing_with_callers(on_full: str) -> None:
    base = random.randrange(1 << 20)
    for r in range(ROUNDS):
        _run_round(base + r, on_full=on_full, threads=8, loops=2, per_caller=40, close_early=True,
                   num_workers=1 + r % 2)


def test_32_threads_failed_items_mixed_timeouts_small_cap() -> None:
    """The shape that crashed the core before it was made free-threading safe."""
    for r in range(ROUNDS):
        handler = Handler(r)
        f = batched_fn(handler, max_batch_size=8, max_delay=0.0002, channel_cap=64)
        out = Outcomes()
        inputs = list(range(1, 32 * 40 + 1))
        chunks = [inputs[i::32] for i in range(32)]

        def caller(xs: list[int], seed: int) -> None:
            rand = random.Random(seed)
            for x in xs:
                try:
                    out.record(x, f(x, timeout=rand.choice((1e-5, 0.5))))
                except Exception as exc:   # noqa: BLE001
                    out.record(x, error=exc)

        threads = [threading.Thread(target=caller, args=(chunks[i], r * 100 + i)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        f.close()
        _check_round(f, handler, out, inputs, "reject", r)


def test_stats_read_while_calls_run_always_add_up() -> None:
    f = batched_fn(lambda b: [Failed(ValueError()) if x % 5 == 0 else x for x in b], max_batch_size=8,
                   max_delay=0, channel_cap=32)
    stop = threading.Event()
    bad: list[Any] = []

    def caller(k: int) -> None:
        i = 0
        while not stop.is_set() and i < 20000:
            i += 1
            try:
                f(i, timeout=0.001 if i % 3 == 0 else None)
            except (ValueError, Full, TimeoutError):
                pass

    def reader() -> None:
        for _ in range(2000):
            s = f.stats()
            if s.submitted != s.completed + s.failed + s.timed_out + s.cancelled + s.queued + s.running \
                    or min(s.queued, s.running) < 0:
                bad.append(s)

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in callers:
        t.start()
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    stop.set()
    for t in callers:
        t.join(60)
    f.close()
    assert not bad, bad[:3]
    s = f.stats()
    assert (s.queued, s.running) == (0, 0)
    assert s.submitted == s.completed + s.failed + s.timed_out + s.cancelled


def test_many_functions_started_and_closed_from_many_threads() -> None:
    """Worker start/stop and close() racing with calls on several functions at once."""
    fns = [batched_fn(lambda b: [x + 1 for x in b], max_batch_size=4, max_delay=0) for _ in range(4)]
    errors: list[BaseException] = []
    got: list[int] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        for i in range(200):
            fn = fns[(k + i) % len(fns)]
            try:
                r = fn(i)
            except Closed:
                continue
            except BaseException as exc:    # noqa: BLE001
                errors.append(exc)
                continue
            with lock:
                got.append(r - i)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    closers = [threading.Thread(target=fn.close) for fn in fns[:2] for _ in range(3)]
    for t in closers:
        t.start()
    for t in threads + closers:
        t.join(60)
    for fn in fns:
        fn.close()
    assert not errors, errors[:3]
    assert set(got) <= {1}
    for fn in fns:
        s = fn.stats()
        assert s.submitted == s.completed and (s.queued, s.running, s.failed) == (0, 0, 0)


def test_mailboxes_of_several_loops_in_one_batch() -> None:
    """One batch holds requests of several event loops (threads): each loop gets only its own."""
    f = batched_fn(lambda b: [(x, threading.get_ident()) for x in b], max_batch_size=64, max_delay=0.002)

    async def main(base: int) -> list[int]:
        res = await asyncio.gather(*(f.acall(base + i) for i in range(300)))
        return [r[0] for r in res]

    results: dict[int, list[int]] = {}

    def run(base: int) -> None:
        results[base] = asyncio.run(main(base))

    threads = [threading.Thread(target=run, args=(k * 1000,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    f.close()
    assert results == {k * 1000: [k * 1000 + i for i in range(300)] for k in range(6)}
    assert f.stats().completed == 1800


# ------------------------------------------------------------------ the interpreter


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    environ.update(env)
    # the batched_fn these tests imported: the source tree, a debug build or the installed wheel
    environ["PYTHONPATH"] = PACKAGE_DIR + os.pathsep + environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environ)


@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter (3.13t or later)")
def test_importing_every_module_leaves_the_gil_off() -> None:
    proc = _run_python(
        "import sys, warnings; warnings.simplefilter('error')\n"
        "import batched_fn, batched_fn.errors, batched_fn.prometheus\n"
        "from batched_fn import _batchcore\n"
        "f = batched_fn.batched_fn(lambda b: b); assert f(1) == 1; f.close()\n"
        "print(sys._is_gil_enabled())\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", proc.stderr


_EXIT_SCRIPT = """
import asyncio, threading
import batched_fn

f = batched_fn.batched_fn(lambda b: b)
g = batched_fn.batched_fn(lambda b: b, max_delay="auto", channel_cap=8, on_full="block")
h = batched_fn.batched_fn(lambda b: b, num_workers=2)
assert f(1, timeout=5) == 1 and g(2, timeout=1) == 2 and h(3) == 3
assert f.submit(4, timeout=3).result() == 4

async def main():
    return await asyncio.gather(f.acall(5, timeout=2), g.acall(6))

assert asyncio.run(main()) == [5, 6]
threads = [threading.Thread(target=lambda: f(7, timeout=10)) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
h.close()
stranded = f.submit(8, timeout=100)   # a pending deadline when the interpreter exits
{extra}
"""


@pytest.mark.parametrize("extra", ["", "del f, g, h, stranded", "import gc; gc.collect()"])
def test_a_process_that_used_the_package_exits_quietly(extra: str) -> None:
    """Nothing on stderr at exit (no 'Exception ignored in ... __del__') and exit status 0."""
    proc = _run_python(_EXIT_SCRIPT.format(extra=extra))
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.skipif(not FREE_THREADED or GIL_FORCED, reason="needs a free-threaded interpreter with its GIL off")
def test_this_run_has_the_gil_off() -> None:
    assert not sys._is_gil_enabled()


_BUSY_EXIT_SCRIPT = """
import asyncio, threading, time
import batched_fn

f = batched_fn.batched_fn(lambda b: b, max_batch_size=8, max_delay=0.0005, channel_cap=64)
g = batched_fn.batched_fn(lambda b: b, max_delay="auto")

def caller():
    i = 0
    while True:
        i += 1
        try:
            f(i, timeout=0.01 if i % 3 else None)
            g.submit(i)
        except Exception:
            pass

async def tasks():
    while True:
        await asyncio.gather(*(f.acall(i, timeout=0.05) for i in range(50)), return_exceptions=True)

for _ in range(8):
    threading.Thread(target=caller, daemon=True).start()
threading.Thread(target=asyncio.run, args=(tasks(),), daemon=True).start()
time.sleep(0.3)
"""


def test_exit_while_threads_and_a_loop_are_calling_is_quiet() -> None:
    """The interpreter exits with daemon threads and an event loop mid-call: status 0, empty stderr."""
    for _ in range(3):
        proc = _run_python(_BUSY_EXIT_SCRIPT)
        assert (proc.returncode, proc.stderr) == (0, "")


# ------------------------------------------------------------------ priorities, whole-call
# timeouts and keyed batches, racing close()

N_KEYS = 3


def _key_of(x: int) -> int:
    return x % N_KEYS


class KeyedHandler:
    """Doubles each input, fails every 11th; records every input and any batch that mixes keys."""

    def __init__(self, seed: int) -> None:
        self.handled: list[int] = []
        self.mixed: list[list[int]] = []
        self.lock = threading.Lock()
        self.rand = random.Random(seed)

    def __call__(self, batch: list[int]) -> list[Any]:
        with self.lock:
            self.handled.extend(batch)
            if len({_key_of(x) for x in batch}) > 1:
                self.mixed.append(list(batch))
            pause = self.rand.random() < 0.2
        if pause:
            time.sleep(0.001)    # a slow batch now and then: deadlines pass inside it, the queue fills
        return [Failed(ValueError(x)) if x % 11 == 0 else 2 * x for x in batch]


def _scheduled_kind(err: BaseException) -> str:
    if isinstance(err, Full) and "shed" in str(err):
        return "shed"
    return _kind(err)


def _priority_caller(f: Any, xs: list[int], prio: dict[int, int], out: Outcomes, seed: int) -> None:
    rand = random.Random(seed)
    for x in xs:
        timeout = rand.choice((None, 1e-4, 0.0015, 0.5))
        try:
            if rand.random() < 0.7:
                out.record(x, f(x, timeout=timeout, priority=prio[x]))
            else:
                out.record(x, f.submit(x, timeout=timeout, priority=prio[x]).result(timeout=30))
        except Exception as exc:     # noqa: BLE001 - every kind is checked
            out.record(x, error=exc)


def _run_scheduled_round(seed: int, on_full: str) -> None:
    rand = random.Random(seed)
    handler = KeyedHandler(seed)
    f = batched_fn(handler, max_batch_size=8, max_delay=0.0005, channel_cap=24, on_full=on_full,
                   batch_key=_key_of, num_workers=1 + seed % 2, priority_aging=0.002)
    threads, per_thread = 12, 50
    inputs = list(range(1, 1 + threads * per_thread))
    prio = {x: rand.choice((0, 0, 1, 5)) for x in inputs}
    rand.shuffle(inputs)
    out = Outcomes()
    callers = [threading.Thread(target=_priority_caller, args=(f, inputs[i::threads], prio, out, seed + i))
               for i in range(threads)]
    for c in callers:
        c.start()
    time.sleep(rand.uniform(0.005, 0.05))
    closer = threading.Thread(target=f.close)    # close() races the callers from its own thread
    closer.start()
    closer.join(60)
    for c in callers:
        c.join(60)
        assert not c.is_alive(), f"a caller hung (seed={seed})"
    f.close()
    ctx = f"seed={seed} on_full={on_full}"

    handled = handler.handled
    handled_set = set(handled)
    assert len(handled) == len(handled_set), f"an input reached the handler twice ({ctx})"
    assert not handler.mixed, (handler.mixed[:2], ctx)
    assert set(out.results) | set(out.errors) == set(inputs), ctx
    kinds: dict[str, set[int]] = {}
    for x, result in out.results.items():
        assert result == 2 * x and x % 11 and x in handled_set, (x, result, ctx)
    for x, err in out.errors.items():
        kind = _scheduled_kind(err)
        kinds.setdefault(kind, set()).add(x)
        assert kind not in ("other", "no_room"), (x, repr(err), ctx)
        if kind == "failed":
            assert err.args == (x,) and x % 11 == 0 and x in handled_set, (x, repr(err), ctx)
        elif kind == "late":
            assert x in handled_set, (x, ctx)           # its batch ran; its output was dropped
        else:
            assert x not in handled_set, (x, kind, ctx)  # never ran
    if on_full != "drop_oldest":
        assert "evicted" not in kinds, ctx

    def n(kind: str) -> int:
        return len(kinds.get(kind, ()))

    # every counter is exactly what the callers and the handler saw
    s = f.stats()
    answered = handled_set - kinds.get("late", set())
    assert s.completed == sum(1 for x in answered if x % 11), (s, ctx)
    assert s.failed == sum(1 for x in answered if x % 11 == 0) + n("evicted"), (s, ctx)
    assert s.timed_out == n("timeout") + n("late"), (s, ctx)
    assert (s.late, s.expired, s.shed) == (n("late"), n("timeout"), n("shed")), (s, ctx)
    assert s.rejected == n("rejected") + n("shed"), (s, ctx)
    assert (s.queued, s.running, s.cancelled) == (0, 0, 0), (s, ctx)
    assert s.submitted == s.completed + s.failed + s.timed_out, (s, ctx)
    # by priority: answered in time, late, shed, expired, each caller counted under its own
    for p in sorted(set(prio.values())):
        mine = {x for x in inputs if prio[x] == p}
        want = (len(answered & mine), len(kinds.get("late", set()) & mine),
                len(kinds.get("shed", set()) & mine), len(kinds.get("timeout", set()) & mine))
        got = s.by_priority.get(p)
        got_t = (0, 0, 0, 0) if got is None else (got.answered, got.late, got.shed, got.expired)
        assert got_t == want, (p, got_t, want, ctx)
    # by key: every input a batch took, under its own key
    for key in range(N_KEYS):
        ks = s.by_key.get(key)
        took = sum(1 for x in handled if _key_of(x) == key)
        assert (0 if ks is None else ks.batched_items) == took, (key, ks, took, ctx)
        assert ks is None or ks.queued == 0, (key, ks, ctx)


@pytest.mark.parametrize("on_full", ["reject", "drop_oldest", "block"])
def test_priorities_whole_call_timeouts_and_keys_racing_close(on_full: str) -> None:
    """Priorities, timeouts that end queued or inside a running batch, shedding and keyed
    batches from many threads while close() comes from another: exact outcomes and counters
    (overall, by priority and by key) that add up."""
    for r in range(ROUNDS):
        _run_scheduled_round(7100 + 13 * r + len(on_full), on_full)
