"""Cross-process batching (GUIDE §6): BatchedFn.share(name) and batched_fn.connect(name).

Owners and clients run in separate processes where the behaviour needs it
(kills, batches mixing processes); the rest shares and connects within the
test process, which goes through the same socket.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import threading
import time
from concurrent.futures import Future

import pytest

import batched_fn
from helpers import HOLD, Hold, identity, stats_balance, wait_until
from _shared_tools import expect_line, share_and_connect, spawn, stop, unique_name
from batched_fn import Closed, Failed, Full, batched_fn as make, connect
from batched_fn._shared import RemoteError, RemoteTraceback, runtime_dir

np = pytest.importorskip("numpy")

NAME_MESSAGE = "invalid name value: expected 1 to 200 letters, digits or '-_.', without '..' (got {!r})"


@pytest.fixture
def shared():
    """shared(handler, **knobs) -> (fn, remote): fn shared under a fresh name, remote connected to it."""
    made = []

    def build(handler=identity, max_item_bytes=4 << 20, **knobs):
        fn, _, remote = share_and_connect(handler, max_item_bytes, **knobs)
        made.append((fn, remote))
        return fn, remote

    yield build
    for fn, remote in made:
        remote.close()
        fn.close(timeout=5)


class Boom(Exception):
    pass


# ---------------------------------------------------------------- names and files

@pytest.mark.parametrize("bad", ["a/b", "..", "a..b", "", "x" * 201, "sp ace", "é"])
def test_bad_names_are_refused_by_share_and_connect(bad):
    fn = make(identity)
    with pytest.raises(ValueError, match=re.escape(NAME_MESSAGE.format(bad))):
        fn.share(bad)
    with pytest.raises(ValueError, match=re.escape(NAME_MESSAGE.format(bad))):
        connect(bad, timeout=0.1)
    fn.close()


def test_a_name_that_is_not_a_str_is_a_type_error():
    with pytest.raises(TypeError, match=re.escape("invalid name value: expected a str (got 42)")):
        connect(42, timeout=0.1)  # type: ignore[arg-type]


def test_longest_name_works():
    name = unique_name()
    name += "x" * (200 - len(name))
    with make(identity) as fn:
        fn.share(name)
        with connect(name, timeout=5) as remote:
            assert remote(7) == 7


def test_max_item_bytes_is_checked():
    fn = make(identity)
    with pytest.raises(ValueError, match=re.escape("invalid max_item_bytes value: expected an int >= 1 (got 0)")):
        fn.share(unique_name(), max_item_bytes=0)
    fn.close()


def test_name_taken_by_a_live_owner_is_refused():
    name = unique_name()
    with make(identity) as first, make(identity) as second:
        first.share(name)
        with pytest.raises(ValueError, match=re.escape(f"name {name!r} is already shared by a live process")):
            second.share(name)
        with connect(name, timeout=5) as remote:
            assert remote(3) == 3    # the first owner still serves


def test_files_are_private_to_the_user():
    name = unique_name()
    with make(identity) as fn:
        fn.share(name)
        directory = runtime_dir()
        st = os.stat(directory)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        files = [f for f in os.listdir(directory) if f.startswith(name)]
        assert sorted(files) == [f"{name}.lock", f"{name}.sock"]
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(directory, f)).st_mode) == 0o600


def test_connect_times_out_when_nobody_shares_the_name():
    name = unique_name()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=re.escape(f"no process shared {name!r} within 0.2s")):
        connect(name, timeout=0.2)
    assert time.monotonic() - start < 5


def test_connect_waits_for_the_name_to_appear():
    name = unique_name()
    fn = make(identity)
    timer = threading.Timer(0.3, fn.share, args=(name,))
    timer.start()
    try:
        with connect(name, timeout=10) as remote:
            assert remote("x") == "x"
    finally:
        timer.join()
        fn.close()


# ---------------------------------------------------------------- call styles

def test_call_submit_and_results_in_order_from_threads(shared):
    fn, remote = shared(lambda b: [x * 10 for x in b], max_batch_size=16, max_delay=0.002)
    assert remote(4) == 40
    assert remote.submit(5).result(timeout=5) == 50
    out: dict[int, int] = {}

    def work(k: int) -> None:
        for i in range(50):
            out[k * 1000 + i] = remote(k * 1000 + i, timeout=5)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {k: k * 10 for k in out} and len(out) == 400
    st = fn.stats()
    assert st.completed == 402 and st.mean_batch_size > 1   # remote calls were batched together


def test_acall_many_tasks(shared, run_async):
    fn, remote = shared(lambda b: [x + 1 for x in b], max_batch_size=32, max_delay=0.002)

    async def main():
        return await asyncio.gather(*(remote.acall(i, timeout=5) for i in range(300)))

    assert run_async(main()) == [i + 1 for i in range(300)]
    assert fn.stats().completed == 300 and fn.stats().batches < 300


def test_acall_cancel_withdraws_the_request_in_the_model_process(shared, run_async):
    hold = Hold(identity)
    fn, remote = shared(hold, max_batch_size=4)
    pinned = hold.pin(fn)

    async def main():
        task = asyncio.ensure_future(remote.acall("x"))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(
            None, wait_until, lambda: fn.stats().queued == 1, 5.0, "the remote call queued")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(main())
    wait_until(lambda: fn.stats().cancelled == 1, 5, "the model process withdrew it")
    hold.release()
    assert pinned.result(timeout=5) == HOLD
    assert stats_balance(fn.stats()) == 0


def test_submit_cancel_withdraws(shared):
    hold = Hold(identity)
    fn, remote = shared(hold)
    pinned = hold.pin(fn)
    fut = remote.submit("y")
    wait_until(lambda: fn.stats().queued == 1, 5, "the remote call queued")
    assert fut.cancel()
    wait_until(lambda: fn.stats().cancelled == 1, 5, "the model process withdrew it")
    hold.release()
    pinned.result(timeout=5)


def test_numpy_arrays_travel_out_of_band(shared):
    fn, remote = shared(lambda b: [a * 2 for a in b])
    a = np.arange(1 << 17, dtype=np.float64)   # 1 MiB
    out = remote(a)
    assert isinstance(out, np.ndarray) and out.dtype == a.dtype and np.array_equal(out, a * 2)
    strided = np.arange(100.0)[::3]            # not contiguous: travels in band
    assert np.array_equal(remote(strided), strided * 2)


# ---------------------------------------------------------------- errors

def test_handler_exception_type_and_message_and_traceback(shared):
    def handler(batch):
        raise Boom(f"bad batch of {len(batch)}")

    fn, remote = shared(handler)
    with pytest.raises(Boom, match=re.escape("bad batch of 1")) as info:
        remote(1)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in handler" in str(info.value.__cause__)


def test_exception_that_cannot_be_rebuilt_arrives_as_text(shared):
    def handler(batch):
        raise Boom(threading.Lock())   # an argument that cannot be pickled

    fn, remote = shared(handler)
    with pytest.raises(RemoteError, match=re.escape(f"{__name__}.Boom: <unlocked _thread.lock object")) as info:
        remote(1)
    assert info.value.type_name == f"{__name__}.Boom"
    assert "raise Boom" in info.value.remote_traceback


def test_failed_fails_one_caller_only(shared):
    fn, remote = shared(lambda b: [Failed(KeyError(x)) if x == "bad" else x for x in b], max_delay=0.05)
    futs = [remote.submit(x) for x in ["a", "bad", "c"]]
    assert futs[0].result(timeout=5) == "a" and futs[2].result(timeout=5) == "c"
    with pytest.raises(KeyError, match="bad"):
        futs[1].result(timeout=5)


def test_full_reaches_the_remote_caller(shared):
    hold = Hold(identity)
    fn, remote = shared(hold, channel_cap=2)
    pinned = hold.pin(fn)
    queued = [remote.submit(i) for i in range(2)]
    wait_until(lambda: fn.stats().queued == 2, 5, "two remote calls queued")
    with pytest.raises(Full) as info:
        remote(99)
    assert info.value.queued == 2
    hold.release()
    assert [f.result(timeout=5) for f in queued] == [0, 1]
    pinned.result(timeout=5)
    assert fn.stats().rejected == 1


def test_on_full_block_waits_for_room_and_keeps_each_deadline(shared):
    hold = Hold(identity)
    fn, remote = shared(hold, channel_cap=1, on_full="block", max_batch_size=8)
    pinned = hold.pin(fn)
    first = remote.submit("a")
    wait_until(lambda: fn.stats().queued == 1, 5, "first call queued")
    second = remote.submit("b", timeout=10)   # waits for room in the model process
    late = remote.submit("c", timeout=0.1)    # behind b: no room within its timeout
    with pytest.raises(TimeoutError):
        late.result(timeout=5)
    assert not second.done()
    hold.release()
    assert first.result(timeout=5) == "a" and second.result(timeout=5) == "b"
    pinned.result(timeout=5)


def test_timeout_reaches_the_remote_caller_on_time(shared):
    hold = Hold(identity)
    fn, remote = shared(hold)
    pinned = hold.pin(fn)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        remote("late", timeout=0.1)
    assert time.monotonic() - start < 2
    assert fn.stats().timed_out == 1
    hold.release()
    pinned.result(timeout=5)


def test_cost_keeps_its_meaning(shared):
    fn, remote = shared(identity, max_batch_size=64, cost=len, max_batch_cost=10)
    with pytest.raises(ValueError, match=re.escape("input cost 11 exceeds max_batch_cost 10")):
        remote("x" * 11)
    assert remote("abc") == "abc"


def test_oversized_input_fails_that_call_only(shared, run_async):
    fn, remote = shared(identity, max_item_bytes=1000)
    big = b"x" * 2000
    msg = re.escape(f"exceeds max_item_bytes=1000 of shared function {remote.name!r}")
    with pytest.raises(ValueError, match=r"input of \d+ bytes " + msg):
        remote(big)
    with pytest.raises(ValueError, match=msg):
        remote.submit(big).result(timeout=5)

    async def main():
        with pytest.raises(ValueError, match=msg):
            await remote.acall(big)
        return await remote.acall(b"small")

    assert run_async(main()) == b"small"
    assert remote(b"ok") == b"ok"
    assert fn.stats().submitted == 2


def test_default_item_limit_lets_a_1mib_array_through(shared):
    fn, remote = shared(lambda b: [a.sum() for a in b])
    assert remote(np.ones(1 << 20, dtype=np.uint8)) == 1 << 20
    with pytest.raises(ValueError, match=re.escape("exceeds max_item_bytes=4194304")):
        remote(np.ones(5 << 20, dtype=np.uint8))


def test_unpicklable_input_fails_that_call_only(shared):
    fn, remote = shared(identity)
    with pytest.raises(TypeError, match=re.escape("input of type lock cannot be pickled: TypeError:")):
        remote(threading.Lock())
    fut = remote.submit(threading.Lock())
    with pytest.raises(TypeError, match=re.escape("input of type lock cannot be pickled")):
        fut.result(timeout=5)
    assert remote("fine") == "fine"


def test_closing_the_owner_withdraws_the_name(shared):
    hold = Hold(identity)
    fn, remote = shared(hold)
    name = remote.name
    pinned = hold.pin(fn)
    waiting = remote.submit("queued")
    wait_until(lambda: fn.stats().queued == 1, 5, "remote call queued")
    closer = threading.Thread(target=fn.close)
    closer.start()
    hold.release()
    closer.join(10)
    assert waiting.result(timeout=5) == "queued"   # what was queued still finishes
    pinned.result(timeout=5)
    with pytest.raises(Closed):
        remote("after")
    assert not os.path.exists(os.path.join(runtime_dir(), f"{name}.sock"))
    with make(identity) as again:                  # the name is free again
        again.share(name)
        with connect(name, timeout=5) as r2:
            assert r2(1) == 1


def test_remote_close_is_local_and_idempotent(shared):
    fn, remote = shared(identity)
    other = connect(remote.name, timeout=5)
    remote.close()
    remote.close()
    with pytest.raises(Closed, match=re.escape(f"connection to shared function {remote.name!r} was closed")):
        remote(1)
    assert other(2) == 2
    other.close()
    assert fn.healthy


# ---------------------------------------------------------------- several processes

def test_batches_mix_items_from_every_process_and_stats_count_them():
    hold = Hold(identity)
    name = unique_name()
    fn = make(hold, max_batch_size=64, max_delay=0.01)
    fn.share(name)
    clients = [spawn("client", name, "10") for _ in range(2)]
    try:
        pinned = hold.pin(fn)
        for c in clients:
            expect_line(c, "submitted")
        wait_until(lambda: fn.stats().queued == 20, 10, "both clients' calls queued")
        hold.release()
        for c in clients:
            expect_line(c, "done")
        pinned.result(timeout=5)
        mixed = [b for b in hold.batches if len({x[0] for x in b if isinstance(x, tuple)}) == 2]
        assert mixed and len(mixed[0]) == 20
        st = fn.stats()
        assert st.submitted == 21 and st.completed == 21
    finally:
        for c in clients:
            stop(c)
        fn.close()


def test_killed_client_loses_only_its_calls():
    hold = Hold(identity)
    name = unique_name()
    fn = make(hold, max_batch_size=64)
    fn.share(name)
    victim = spawn("client", name, "5")
    try:
        pinned = hold.pin(fn)
        with connect(name, timeout=5) as remote:
            mine = remote.submit("mine")
            expect_line(victim, "submitted")
            wait_until(lambda: fn.stats().queued == 6, 10, "all calls queued")
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            wait_until(lambda: fn.stats().cancelled == 5, 5, "the killed client's calls withdrawn")
            assert fn.stats().queued == 1
            hold.release()
            assert mine.result(timeout=5) == "mine"
            assert remote("later") == "later"
        pinned.result(timeout=5)
        assert stats_balance(fn.stats()) == 0
    finally:
        stop(victim)
        fn.close()


def test_killed_owner_fails_every_call_with_closed_and_a_new_owner_takes_the_name(run_async):
    name = unique_name()
    owner = spawn("owner", name)
    try:
        expect_line(owner, "ready")
        remote = connect(name, timeout=10)
        assert remote(21) == 42
        blocked = [remote.submit("hang")] + [remote.submit(i) for i in range(3)]
        results: list[BaseException] = []

        def sync_call() -> None:
            try:
                remote(5)
            except BaseException as exc:
                results.append(exc)

        async def async_call():
            t = asyncio.ensure_future(remote.acall(6))
            await asyncio.sleep(0.3)
            owner.send_signal(signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(Closed):
                await t
            return time.monotonic() - start

        thread = threading.Thread(target=sync_call)
        thread.start()
        took = run_async(async_call())
        assert took < 2
        thread.join(2)
        assert not thread.is_alive() and len(results) == 1 and isinstance(results[0], Closed)
        for fut in blocked:
            with pytest.raises(Closed):
                fut.result(timeout=2)
        with pytest.raises(Closed):
            remote(7)                      # later calls fail at once
        remote.close()
        owner.wait(10)
        # The dead owner's socket file is still there; a new owner replaces it.
        assert os.path.exists(os.path.join(runtime_dir(), f"{name}.sock"))
        with make(lambda b: [x * 3 for x in b]) as fn:
            fn.share(name)
            with connect(name, timeout=5) as again:
                assert again(2) == 6
    finally:
        stop(owner)


def test_connect_reaches_an_owner_in_another_process():
    name = unique_name()
    owner = spawn("owner", name)
    try:
        # connect before the owner shares: it waits for the name
        fut: Future = Future()
        threading.Thread(target=lambda: fut.set_result(connect(name, timeout=30))).start()
        expect_line(owner, "ready")
        remote = fut.result(timeout=30)
        assert remote.owner_pid == owner.pid
        assert [remote(i) for i in range(3)] == [0, 2, 4]
        remote.close()
    finally:
        stop(owner)


def test_connect_is_exported():
    assert batched_fn.connect is connect and "connect" in batched_fn.__all__


def test_mypy_accepts_the_shared_modules(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if exe is None:
        pytest.skip("mypy is not installed (it is in the [test] extra)")
    package = Path(__file__).resolve().parents[2] / "python" / "batched_fn" / "_shared"
    proc = subprocess.run([exe, "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), *map(str, sorted(package.glob("*.py")))],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_two_event_loops_in_two_threads_share_one_connection(shared):
    fn, remote = shared(lambda b: [x * 2 for x in b], max_delay=0.001)
    results: dict[int, list[int]] = {}

    def run(k: int) -> None:
        async def main():
            return await asyncio.gather(*(remote.acall(k * 100 + i, timeout=5) for i in range(50)))

        results[k] = asyncio.run(main())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {k: [(k * 100 + i) * 2 for i in range(50)] for k in range(2)}


def test_client_killed_while_its_calls_run_in_a_batch():
    entered, release = threading.Event(), threading.Event()

    def handler(batch):
        if any(isinstance(x, tuple) for x in batch):   # the victim's calls
            entered.set()
            release.wait(30)
        return list(batch)

    name = unique_name()
    fn = make(handler, max_batch_size=64, max_delay=0.05)
    fn.share(name)
    victim = spawn("client", name, "5")
    try:
        expect_line(victim, "submitted")
        assert entered.wait(10)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        release.set()                      # its outputs go nowhere; the owner goes on
        with connect(name, timeout=5) as remote:
            assert remote("after") == "after"
        wait_until(lambda: fn.stats().completed == 6, 5, "every call completed")
        assert fn.healthy and stats_balance(fn.stats()) == 0
    finally:
        stop(victim)
        fn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_connect():
    import socket

    name = unique_name()
    with make(identity) as fn:
        fn.share(name)
        path = os.path.join(runtime_dir(), f"{name}.sock")
        pid = os.fork()
        if pid == 0:   # become nobody and try the socket directly
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                except PermissionError:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "another user reached the socket"
        assert fn.stats().submitted == 0


def test_sharing_one_function_twice_is_refused():
    first = unique_name()
    with make(identity) as fn:
        fn.share(first)
        with pytest.raises(ValueError, match=re.escape(f"this function is already shared as {first!r}")):
            fn.share(unique_name())
        with connect(first, timeout=5) as remote:
            assert remote(1) == 1
