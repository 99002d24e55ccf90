"""close() from everywhere, garbage collection, interpreter exit, fork and Ctrl-C."""

from __future__ import annotations

import gc
import re
import os
import threading
import weakref
from typing import Any

import pytest

from batched_fn import Closed, batched_fn
from helpers import HOLD, MSG_CLOSED, Hold, assert_clean_exit, identity, run_script, stats_balance, wait_until


def test_close_from_inside_the_handler_finishes_its_batch_and_the_queue() -> None:
    holder: list[Any] = []

    def handler(batch: list[Any]) -> list[Any]:
        if HOLD in batch:
            holder[0].close()        # from the worker itself: must not join itself
        return [x if x is HOLD else x * 3 for x in batch]

    hold = Hold(handler)
    fn = batched_fn(hold, max_batch_size=2, max_delay=0)
    holder.append(fn)
    pinned = hold.pin(fn)
    queued = [fn.submit(i) for i in range(5)]
    hold.release()
    assert pinned.result(5) == HOLD
    assert [f.result(5) for f in queued] == [0, 3, 6, 9, 12]
    with pytest.raises(Closed, match=MSG_CLOSED):
        fn(1)
    wait_until(lambda: not any(t.is_alive() for t in fn._workers), what="worker exit")
    st = fn.stats()
    assert st.submitted == st.completed == 6 and stats_balance(st) == 0


def test_close_from_another_thread_while_calls_are_in_flight() -> None:
    fn = batched_fn(lambda b: [x * 2 for x in b], max_batch_size=4, max_delay=0.0005, num_workers=2)
    outcomes: list[tuple[int, Any]] = []
    lock = threading.Lock()
    started = threading.Barrier(5)

    def client(base: int) -> None:
        started.wait()
        local = []
        for i in range(base, base + 10_000):
            try:
                local.append((i, fn(i, timeout=10)))
            except Closed:
                local.append((i, Closed))
                break
        with lock:
            outcomes.extend(local)

    threads = [threading.Thread(target=client, args=(k * 100_000,)) for k in range(4)]
    for t in threads:
        t.start()
    started.wait()
    wait_until(lambda: fn.stats().completed >= 200, what="some calls done")
    fn.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a caller hung across close()"
    assert all(r is Closed or r == i * 2 for i, r in outcomes)
    assert sum(r is Closed for _, r in outcomes) == 4, "every client must end on Closed"
    st = fn.stats()
    assert st.queued == st.running == 0 and stats_balance(st) == 0
    assert st.completed == len(outcomes) - 4
    assert not fn.healthy


def test_close_twice_and_before_start() -> None:
    fn = batched_fn(identity)
    fn.close()
    fn.close()
    with pytest.raises(Closed, match=MSG_CLOSED):
        fn(1)
    with pytest.raises(Closed, match=MSG_CLOSED):
        fn.start()
    with pytest.raises(Closed, match=MSG_CLOSED):
        fn.submit(1)
    assert fn._workers == []
    with batched_fn(identity) as other:
        assert other(2) == 2
    other.close()
    assert not other.healthy


def test_close_concurrent_with_start_never_hangs_or_leaks_workers() -> None:
    for round_ in range(30):
        def slow_context() -> str:
            threading.Event().wait(0.001 * (round_ % 3))
            return "ctx"

        def handler(batch: list[Any], ctx: str) -> list[Any]:
            return batch

        fn = batched_fn(handler, num_workers=2, context={"ctx": slow_context})
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def starter() -> None:
            barrier.wait()
            try:
                fn.start()
            except Closed:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def closer() -> None:
            barrier.wait()
            fn.close(timeout=5)

        threads = [threading.Thread(target=starter), threading.Thread(target=closer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), f"round {round_}: start/close hung"
        assert not errors, errors
        fn.close(timeout=5)
        assert not any(w.is_alive() for w in fn._workers), f"round {round_}: a worker outlived close()"
        with pytest.raises(Closed, match=MSG_CLOSED):
            fn(1)


def test_unclosed_batcher_is_collected_and_its_workers_exit() -> None:
    def gc_probe_handler(batch: list[Any]) -> list[Any]:
        return [x + 1 for x in batch]

    fn = batched_fn(gc_probe_handler, max_batch_size=4, max_delay=0.0005)
    assert fn(1) == 2
    pending = [fn.submit(i) for i in range(20)]
    ref = weakref.ref(fn)
    workers = list(fn._workers)
    del fn
    gc.collect()
    assert ref() is None, f"an unclosed BatchedFn is kept alive by {gc.get_referrers(ref())!r}"
    assert [f.result(5) for f in pending] == list(range(1, 21)), "queued requests lost at collection"
    for w in workers:
        w.join(5)
    assert not any(w.is_alive() for w in workers), "workers outlived their collected batcher"


# ------------------------------------------------------------ subprocesses


def test_interpreter_exit_with_workers_alive_and_requests_queued() -> None:
    proc = run_script("""
        import sys, threading, time
        from batched_fn import batched_fn

        def slow(batch):
            time.sleep(0.01)
            return batch

        f = batched_fn(slow, max_batch_size=4, max_delay=0.001)
        done = []
        for i in range(200):
            f.submit(i).add_done_callback(lambda fut: done.append(fut.exception() is None))

        def hammer():
            while True:
                try:
                    f(1)
                except Exception:
                    return

        for _ in range(3):
            threading.Thread(target=hammer, daemon=True).start()
        time.sleep(0.1)
        assert f.stats().queued > 0
        sys.stdout.write("main done\\n")
        import atexit
        # Registered after batched_fn's hook, so it runs before it: nothing is drained yet.
        atexit.register(lambda: sys.stdout.write(f"queued at exit {f.stats().queued}\\n"))
    """, timeout=60)
    assert_clean_exit(proc)
    assert "main done" in proc.stdout


def test_interpreter_exit_drains_queued_futures() -> None:
    proc = run_script("""
        import os, time
        from batched_fn import batched_fn

        def slow(batch):
            time.sleep(0.002)
            return batch

        f = batched_fn(slow, max_batch_size=8, max_delay=0.001)
        for i in range(300):
            f.submit(i).add_done_callback(lambda fut: os.write(1, b"R" if fut.result() is not None else b"?"))
    """, timeout=60)
    assert_clean_exit(proc)
    assert proc.stdout.count("R") == 300, proc.stdout


def test_interpreter_exit_with_a_handler_that_never_returns() -> None:
    proc = run_script("""
        import threading
        from batched_fn import batched_fn
        never = threading.Event()

        def stuck(batch):
            never.wait()
            return batch

        f = batched_fn(stuck, max_batch_size=2, max_delay=0)
        futures = [f.submit(i) for i in range(10)]
        threading.Thread(target=lambda: f(99), daemon=True).start()
        import time; time.sleep(0.05)
        print("exiting with", f.stats().queued, "queued")
    """, timeout=30)
    assert_clean_exit(proc)
    assert "exiting with" in proc.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_fork_after_start_child_restarts_its_workers() -> None:
    proc = run_script("""
        import os, signal, threading, time
        from batched_fn import batched_fn, Closed

        hold = threading.Event()

        def handler(batch):
            if "hold" in batch:
                hold.wait()
            return [(os.getpid(), x) for x in batch]

        f = batched_fn(handler, max_batch_size=4, max_delay=0.001, num_workers=2)
        g = batched_fn(handler)
        assert f(1) == (os.getpid(), 1)
        g.close()
        stuck = f.submit("hold")           # a worker is busy in the parent at fork time
        queued = [f.submit(i) for i in range(5)]
        time.sleep(0.05)
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)               # a deadlock ends the child with SIGALRM
            try:
                me = os.getpid()
                ok = f(2, timeout=5) == (me, 2)
                ok &= f.submit(3, timeout=5).result(5) == (me, 3)
                ok &= [f.submit(i).result(5) for i in range(10)] == [(me, i) for i in range(10)]
                try:
                    g(1)
                    ok = False
                except Closed:
                    pass
                f.close(timeout=5)
                os._exit(0 if ok else 3)
            except BaseException as exc:
                os.write(2, repr(exc).encode())
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        hold.set()
        assert stuck.result(5) == (os.getpid(), "hold")
        assert [q.result(5) for q in queued] == [(os.getpid(), i) for i in range(5)]
        print("child status", status)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    """, timeout=60)
    assert_clean_exit(proc)


def test_ctrl_c_reaches_a_blocking_caller_promptly() -> None:
    proc = run_script("""
        import os, signal, threading, time
        from batched_fn import batched_fn

        release = threading.Event()

        def handler(batch):
            release.wait()
            return batch

        f = batched_fn(handler, max_batch_size=1, max_delay=0)
        main = threading.get_ident()

        def interrupt_later(delay):
            time.sleep(delay)
            sent[0] = time.monotonic()
            signal.pthread_kill(main, signal.SIGINT)

        # 1: the caller's request is inside the handler; 2: it is queued behind it.
        for case in ("taken", "queued"):
            sent = [0.0]
            threading.Thread(target=interrupt_later, args=(0.2,)).start()
            try:
                f(case)
                raise SystemExit("the call returned instead of being interrupted")
            except KeyboardInterrupt:
                latency = time.monotonic() - sent[0]
            print(case, "latency", round(latency, 4))
            assert latency < 2.0, latency      # a hang guard; the design bound is ~50 ms
        st = f.stats()
        assert st.cancelled == 1, st           # the queued one was withdrawn
        release.set()
        assert f("after", timeout=5) == "after"
        f.close(timeout=5)
        st = f.stats()
        assert st.submitted == st.completed + st.cancelled, st
        print("ok")
    """, timeout=60)
    assert_clean_exit(proc)
    assert "ok" in proc.stdout


def test_a_bound_method_handler_does_not_keep_its_object_alive() -> None:
    class Model:
        def __init__(self) -> None:
            self.predict = batched_fn(self._predict, max_batch_size=4, max_delay=0)

        def _predict(self, batch: list[int]) -> list[int]:
            return [x + 1 for x in batch]

    before = threading.active_count()
    models = [Model() for _ in range(5)]
    assert [m.predict(1) for m in models] == [2] * 5
    channels = [weakref.ref(m.predict._chan) for m in models]
    refs = [weakref.ref(m) for m in models]
    del models
    # a worker may still hold its handler for a moment after its caller returned:
    # collect until the cycles (model <-> its batched function) are gone
    wait_until(lambda: gc.collect() >= 0 and all(r() is None for r in refs), what="the models collected")
    wait_until(lambda: threading.active_count() <= before, what="their workers gone")
    gc.collect()
    assert all(c() is None for c in channels)


def test_a_closed_function_is_freed_although_a_deadline_was_pending() -> None:
    from batched_fn._batchcore import pending
    before = pending()
    fn = batched_fn(identity, max_batch_size=4, max_delay=0)
    assert fn.submit(1, timeout=30).result(5) == 1
    chan = weakref.ref(fn._chan)
    fn.close()
    assert pending() == before          # close() dropped its finished entries
    del fn
    gc.collect()
    assert chan() is None               # nothing keeps the channel (and its ring) alive


def test_copying_or_pickling_a_batched_function_is_refused() -> None:
    import copy
    import pickle
    with batched_fn(identity) as fn:
        message = "cannot copy a BatchedFn (identity): it owns worker threads and a queue; share the object instead"
        with pytest.raises(TypeError, match=re.escape(message)):
            copy.copy(fn)
        with pytest.raises(TypeError, match=re.escape(message)):
            copy.deepcopy(fn)
        with pytest.raises(TypeError, match=re.escape(
                "cannot pickle a BatchedFn (identity): it owns worker threads and a queue")):
            pickle.dumps(fn)
        assert fn(3) == 3                   # the original still works


def test_a_worker_that_fails_to_start_leaves_no_orphans(monkeypatch: pytest.MonkeyPatch) -> None:
    from batched_fn import _worker
    real_start = _worker.Worker.start
    failures = {"left": 1}

    def flaky_start(self: Any) -> None:
        if self.index == 1 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(_worker.Worker, "start", flaky_start)
    fn = batched_fn(identity, num_workers=3)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        fn(1)
    assert [w.index for w in fn._workers] == [0]        # the started one is kept
    assert fn(2) == 2                                     # only the missing ones start now
    assert sorted(w.index for w in fn._workers) == [0, 1, 2]
    assert len({id(w) for w in fn._workers}) == 3
    fn.close()
    assert not any(w.is_alive() for w in fn._workers)
