"""Cross-process batching under attack and carelessness (GUIDE §6 "Robustness").

Whatever one connection does (hangs up, sends garbage, stalls, leaks its
RemoteFn) costs that connection alone; timeouts and cancels hold across the
boundary; every result reaches its caller.  Raw sockets play the misbehaving
client where the public API cannot.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref

import pytest

from helpers import HOLD, PACKAGE_DIR, Hold, identity, stats_balance, wait_until
from _shared_tools import HERE, expect_line, share_and_connect, stop, unique_name
from batched_fn import BatchedFnError, Full, batched_fn as make, connect
from batched_fn._shared import runtime_dir
from batched_fn._shared._names import socket_path

HEADER = struct.Struct("<QQ")


@pytest.fixture
def shared():
    """shared(handler, **knobs) -> (fn, name, remote): fn shared under a fresh name, remote connected."""
    made = []

    def build(handler=identity, max_item_bytes=4 << 20, **knobs):
        fn, name, remote = share_and_connect(handler, max_item_bytes, **knobs)
        made.append((fn, remote))
        return fn, name, remote

    yield build
    for fn, remote in made:
        remote.close()
        fn.close(timeout=5)


def raw(name: str) -> socket.socket:
    """A bare connection to name (the model process's greeting read off)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(socket_path(runtime_dir(), name))
    meta_len, data_len = HEADER.unpack(_recv_exact(sock, HEADER.size))
    _recv_exact(sock, meta_len + data_len)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def read_records(sock: socket.socket) -> list:
    """The records of the next frame on sock."""
    meta_len, data_len = HEADER.unpack(_recv_exact(sock, HEADER.size))
    body = _recv_exact(sock, meta_len + data_len)
    return pickle.loads(body[:meta_len])


def frame(meta: bytes, data: bytes = b"") -> bytes:
    return HEADER.pack(len(meta), len(data)) + meta + data


def spawn_owner(name: str, nofile: int | None = None) -> subprocess.Popen:
    """_shared_tools.py's owner in a fresh interpreter, optionally with few file descriptors."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONASYNCIODEBUG", None)

    def limit() -> None:
        if nofile is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_shared_tools.py"), "owner", name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=None if nofile is None else limit)
    expect_line(proc, "ready")
    return proc


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connect_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("batched_fn-connect-"))


# ---------------------------------------------------------------- one client never takes the model down

def test_clients_hanging_up_at_once_cost_only_themselves(shared):
    fn, name, remote = shared(lambda b: [x * 2 for x in b])
    path = socket_path(runtime_dir(), name)
    for i in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if i % 2:   # and some with a reset instead of a plain close
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    for i in range(20):   # connect() giving up at once, as a slow start would make it
        try:
            connect(name, timeout=0.0).close()
        except TimeoutError:
            pass
    assert remote(21, timeout=5) == 42 and not remote.closed
    with connect(name, timeout=5) as other:
        assert other(5) == 10


@pytest.mark.parametrize("garbage, why", [
    (frame(b"\x80\x05not a pickle"), "undecodable frame metadata"),
    (frame(pickle.dumps({"a": 1}, protocol=5)), "frame metadata is a dict, not a list of records"),
    (frame(pickle.dumps([(0,)], protocol=5)), "a call record has 1 fields, not 5"),
    (frame(pickle.dumps([(0, 1, b"x", (10,), None)], protocol=5)), "do not fit the frame's data"),
    (frame(pickle.dumps(["call"], protocol=5)), "a record is a str, not a tuple"),
    (frame(pickle.dumps([(0, 1, 2, None, "soon")], protocol=5)), "options are a str, not a dict"),
    (frame(pickle.dumps([(1, [1])], protocol=5)), "a cancel record (1, [1]) has no int id"),
    (frame(pickle.dumps([(42,)], protocol=5)), "unknown record 42"),
    (HEADER.pack(1 << 62, 0), "frame of 4611686018427387904 bytes exceeds the limit of 67108864 bytes"),
])
def test_a_malformed_frame_closes_that_connection_with_a_reason(shared, caplog, garbage, why):
    fn, name, remote = shared(lambda b: [x * 2 for x in b])
    bad = raw(name)
    with caplog.at_level(logging.WARNING, logger="batched_fn"):
        bad.sendall(garbage)
        records = read_records(bad)
        assert records[0][0] == 5 and why in records[0][1]   # BYE, and why
        assert bad.recv(1) == b""                           # then the connection is closed
    assert any("closing a connection" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    bad.close()
    assert remote(4, timeout=5) == 8 and fn.healthy


def test_accept_out_of_descriptors_backs_off_and_serves_again():
    name = unique_name()
    owner = spawn_owner(name, nofile=48)
    socks = []
    try:
        path = socket_path(runtime_dir(), name)
        for _ in range(120):   # far more than the model process has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except (BlockingIOError, ConnectionRefusedError, OSError):
                s.close()
                break
            socks.append(s)
        time.sleep(0.3)   # the model process meets EMFILE meanwhile
        for s in socks:
            s.close()
        socks.clear()
        with connect(name, timeout=10) as remote:
            assert remote(3, timeout=10) == 6
        assert owner.poll() is None
    finally:
        for s in socks:
            s.close()
        owner.kill()
        _, err = owner.communicate(timeout=10)
    assert "Too many open files" in err and "trying again" in err, err


def test_a_dropped_remote_fn_stays_open_for_its_submitted_calls(shared):
    fn, name, remote = shared(lambda b: [x + 1 for x in b])
    fut = connect(name, timeout=5).submit(41)
    gc.collect()
    assert fut.result(timeout=5) == 42


def test_a_client_that_never_reads_its_replies_is_not_read_either(shared, monkeypatch):
    from batched_fn._shared import _owner

    monkeypatch.setattr(_owner, "MAX_REPLY_BACKLOG", 4 << 20)
    fn, name, remote = shared(lambda b: [b"r" * (1 << 20) if x == "big" else x for x in b])
    bad = raw(name)
    bad.setblocking(False)
    meta = pickle.dumps([(0, i, "big", None, None) for i in range(10)], protocol=5)
    sent = 0
    for _ in range(100):   # 1000 calls of 1 MiB replies, as far as the model process takes them
        try:
            bad.sendall(frame(meta))
            sent += 10
        except BlockingIOError:
            break
        time.sleep(0.01)
    time.sleep(0.5)
    # the model process stopped reading it once 4 MiB of replies backed up (plus what was in flight)
    submitted = fn.stats().submitted
    assert sent == 1000 and submitted <= 200, (sent, submitted)   # unpaused it would take all 1000
    assert [remote(i, timeout=5) for i in range(20)] == list(range(20))   # others go on
    bad.close()
    assert remote("after", timeout=5) == "after"


def test_a_remote_fn_dropped_without_close_is_collected(shared):
    fn, name, remote = shared(lambda b: [x + 1 for x in b])
    gc.collect()
    threads, fds = connect_threads(), open_fds()
    for i in range(30):
        dropped = connect(name, timeout=5)
        assert dropped(i, timeout=5) == i + 1
        ref = weakref.ref(dropped)
        del dropped
        gc.collect()
        assert ref() is None, "the RemoteFn is kept alive"
    wait_until(lambda: connect_threads() == threads, 10, "the dropped connections' threads end")
    # the client's fds and the model process's (both in this process here) are back where they were
    wait_until(lambda: open_fds() <= fds, 10, f"fds back to {fds}")
    assert remote(1, timeout=5) == 2


# ---------------------------------------------------------------- timeouts and cancels across the boundary

@pytest.fixture
def stopped_owner():
    """(name, proc): a model process in its own interpreter, SIGSTOPped after connecting (SIGCONT at the end)."""
    name = unique_name()
    proc = spawn_owner(name)
    yield name, proc
    proc.send_signal(signal.SIGCONT)
    stop(proc)


def test_the_client_keeps_its_own_timeout_when_the_model_process_is_stopped(stopped_owner, run_async):
    name, proc = stopped_owner
    remote = connect(name, timeout=10)
    assert remote(1, timeout=5) == 2
    proc.send_signal(signal.SIGSTOP)
    outcome: list = []

    def call() -> None:
        t0 = time.monotonic()
        try:
            remote(2, timeout=0.3)
        except BaseException as exc:
            outcome.append((exc, time.monotonic() - t0))

    t = threading.Thread(target=call)
    t.start()
    fut = remote.submit(3, timeout=0.3)
    t.join(10)
    assert outcome, "the blocking call still waits on a stopped model process"
    exc, _ = outcome[0]
    assert isinstance(exc, TimeoutError) and "no reply from shared function" in str(exc)
    with pytest.raises(TimeoutError, match="no reply from shared function"):
        fut.result(timeout=10)

    async def main():
        with pytest.raises(TimeoutError, match="no reply from shared function"):
            await asyncio.wait_for(remote.acall(4, timeout=0.3), 10)

    run_async(main())
    proc.send_signal(signal.SIGCONT)
    assert remote(5, timeout=5) == 10   # the late calls were withdrawn; the connection goes on
    remote.close()


@pytest.mark.aio
def test_acall_never_blocks_the_loop_on_a_send(stopped_owner, run_async):
    name, proc = stopped_owner
    remote = connect(name, timeout=10)
    proc.send_signal(signal.SIGSTOP)
    blob = b"x" * 3_000_000   # 10 of them: 30 MB that a stopped reader never takes

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        calls = [asyncio.create_task(remote.acall(blob)) for _ in range(10)]
        await asyncio.sleep(0.5)
        seen = ticks
        proc.send_signal(signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        done.set()
        await tick_task
        return seen, results

    seen, results = run_async(main())
    assert seen >= 5, f"the event loop ran {seen} times in 0.5 s while 30 MB waited to be sent"
    assert results == [blob * 2] * 10
    remote.close()


def test_too_much_waiting_to_be_sent_is_full_for_acall_and_a_wait_for_blocking_calls(stopped_owner, run_async,
                                                                                     monkeypatch):
    from batched_fn._shared import _client

    monkeypatch.setattr(_client, "MAX_SEND_BACKLOG", 1 << 20)
    name, proc = stopped_owner
    remote = connect(name, timeout=10)
    proc.send_signal(signal.SIGSTOP)
    blob = b"x" * 3_000_000

    def from_threads() -> None:
        with pytest.raises(Full, match="bytes wait to be sent"):
            remote.submit(blob)
        with pytest.raises(Full, match="bytes wait to be sent"):
            remote(blob, timeout=0.2)   # waited for the backlog to drain, up to its timeout

    async def main():
        first = asyncio.ensure_future(remote.acall(blob))
        await asyncio.sleep(0.2)   # written as far as the socket takes; the rest waits
        with pytest.raises(Full, match=r"\d+ bytes wait to be sent to shared function"):
            await remote.acall(blob)
        await asyncio.get_running_loop().run_in_executor(None, from_threads)
        proc.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(first, 30) == blob * 2

    run_async(main())
    assert remote(b"ab", timeout=10) == b"abab"
    remote.close()


def test_calls_queued_together_beyond_the_frame_limit_go_in_several_frames(shared, run_async):
    fn, name, remote = shared(lambda b: [len(x) for x in b], max_batch_size=64)
    blob = b"z" * 3_000_000

    async def main():   # one loop iteration queues 75 MB: more than one 64 MiB frame
        return await asyncio.wait_for(asyncio.gather(*(remote.acall(blob) for _ in range(25))), 60)

    assert run_async(main()) == [len(blob)] * 25
    assert not remote.closed


@pytest.mark.aio
def test_block_cancelled_remote_acall_is_withdrawn(shared, run_async):
    hold = Hold(identity)
    fn, name, remote = shared(hold, channel_cap=1, on_full="block", max_batch_size=1)

    async def main():
        queued = asyncio.ensure_future(remote.acall("queued"))
        for _ in range(500):
            if fn.stats().queued == 1:
                break
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(remote.acall("waits for room"))
        await asyncio.sleep(0.2)
        waiting.cancel()
        queued.cancel()
        await asyncio.sleep(0)
        return queued, waiting

    pinned = hold.pin(fn)
    run_async(main())
    wait_until(lambda: fn.stats().cancelled == 1, 5, "the queued call withdrawn")
    hold.release()
    pinned.result(timeout=5)
    assert remote("after", timeout=5) == "after"
    ran = [x for b in hold.batches for x in b]
    assert ran == [HOLD, "after"], ran
    assert stats_balance(fn.stats()) == 0


def test_block_a_timed_call_is_not_held_behind_one_without_timeout(shared):
    hold = Hold(identity)
    fn, name, remote = shared(hold, channel_cap=1, on_full="block", max_batch_size=1)
    pinned = hold.pin(fn)
    queued = remote.submit("queued")
    wait_until(lambda: fn.stats().queued == 1, 5, "one call queued")
    patient = remote.submit("patient")            # waits for room, no timeout
    time.sleep(0.1)
    late = remote.submit("late", timeout=0.3)     # behind it, with a timeout
    wait_until(late.done, 3, "the timed call failed on time")
    with pytest.raises(TimeoutError, match="no room"):
        late.result()
    assert not patient.done()
    hold.release()
    assert pinned.result(timeout=5) == HOLD
    assert queued.result(timeout=5) == "queued" and patient.result(timeout=5) == "patient"


def test_a_timed_out_request_gives_its_channel_cap_slot_back_at_once():
    hold = Hold(identity)
    with make(hold, channel_cap=2, max_batch_size=1) as fn:
        pinned = hold.pin(fn)
        late = [fn.submit(i, timeout=0.05) for i in range(2)]
        for fut in late:
            with pytest.raises(TimeoutError):
                fut.result(timeout=5)
        cancelled = fn.submit("c")
        assert cancelled.cancel()
        assert fn.stats().queued == 0
        for round in range(5):   # more withdrawn requests than the queue has room for
            for fut in [fn.submit(i, timeout=0.02) for i in range(2)]:
                with pytest.raises(TimeoutError):
                    fut.result(timeout=5)
            assert fn.stats().queued == 0
        fresh = [fn.submit(f"new{i}") for i in range(2)]   # room for two again: no Full
        with pytest.raises(Full, match=re.escape("queue full: 2 requests waiting (channel_cap=2)")):
            fn.submit("over")
        hold.release()
        assert pinned.result(timeout=5) == HOLD
        assert [f.result(timeout=5) for f in fresh] == ["new0", "new1"]
        assert stats_balance(fn.stats()) == 0


# ---------------------------------------------------------------- every result reaches its caller

def test_close_inside_the_handler_still_delivers_the_batch_and_the_queue(shared):
    gate = threading.Event()
    holder: list = []

    def handler(batch):
        if "first" in batch:
            gate.wait(10)
        if "stop" in batch:
            holder[0].close()
        return [f"{x}!" for x in batch]

    fn, name, remote = shared(handler, max_batch_size=2, max_delay=0.0)
    holder.append(fn)
    first = remote.submit("first")
    wait_until(lambda: fn.stats().running == 1, 5, "first batch running")
    rest = [remote.submit(x) for x in ("stop", 1, 2, 3)]
    wait_until(lambda: fn.stats().queued == 4, 5, "four queued")
    gate.set()
    assert [f.result(timeout=10) for f in [first, *rest]] == ["first!", "stop!", "1!", "2!", "3!"]
    wait_until(lambda: remote.closed, 10, "the name withdrawn afterwards")


class Explosive:
    """An output whose pickling raises a BaseException."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self):
        raise self.exc


class Unprintable(Exception):
    def __str__(self) -> str:
        raise KeyboardInterrupt


def test_a_base_exception_while_encoding_a_reply_never_leaves_a_caller_waiting(shared):
    def handler(batch):
        out = []
        for x in batch:
            out.append(Explosive(SystemExit(3)) if x == "exit" else Explosive(KeyboardInterrupt())
                       if x == "ki" else x)
        return out

    fn, name, remote = shared(handler, max_batch_size=8, max_delay=0.05)
    futs = [remote.submit(x) for x in ("exit", "ok", "ki", 7)]
    with pytest.raises(BatchedFnError, match="output of type Explosive cannot be pickled: SystemExit"):
        futs[0].result(timeout=5)
    assert futs[1].result(timeout=5) == "ok"
    with pytest.raises(BatchedFnError, match="cannot be pickled: KeyboardInterrupt"):
        futs[2].result(timeout=5)
    assert futs[3].result(timeout=5) == 7

    def raising(batch):
        raise Unprintable("boom")

    fn2, name2, remote2 = shared(raising)
    with pytest.raises(Unprintable):
        remote2.submit(1).result(timeout=5)
    assert remote(5, timeout=5) == 5


def test_large_replies_are_written_from_their_memory_in_linear_steps():
    from batched_fn._shared._wire import SendQueue

    class Sock:
        """Takes 64 KiB a call; remembers what each call was given."""

        def __init__(self) -> None:
            self.calls: list[list[memoryview]] = []
            self.got = bytearray()

        def sendmsg(self, parts):
            self.calls.append(list(parts))
            n = 0
            for p in parts:
                take = min(len(p), (64 << 10) - n)
                self.got += p[:take]
                n += take
                if n == 64 << 10:
                    break
            return n

    big = bytes(range(256)) * (8 << 12)    # 8 MiB
    q = SendQueue()
    q.extend([b"head", memoryview(big)])
    sock = Sock()
    assert q.send(sock)
    assert bytes(sock.got) == b"head" + big
    assert len(sock.calls) == (len(big) + 4 + (64 << 10) - 1) // (64 << 10)
    # every write is handed views of the reply's own memory, never a copy of what is left
    assert all(p.obj is big for call in sock.calls[1:] for p in call)


def test_a_100_mb_reply_arrives_whole_while_other_callers_go_on(shared):
    np = pytest.importorskip("numpy")

    def handler(batch):
        return [np.full(100 << 20, 7, dtype=np.uint8) if x == "big" else x for x in batch]

    fn, name, remote = shared(handler, max_delay=0.0)
    big = remote.submit("big")
    with connect(name, timeout=5) as other:
        assert [other(i, timeout=30) for i in range(50)] == list(range(50))
    out = big.result(timeout=60)
    assert out.nbytes == 100 << 20 and int(out.min()) == int(out.max()) == 7


def test_max_item_bytes_holds_for_every_input_type_and_in_the_model_process(shared):
    fn, name, remote = shared(identity, max_item_bytes=1 << 20)
    huge_int = 1 << (10 * 8 << 20)
    with pytest.raises(ValueError, match=r"input of \d+ bytes exceeds max_item_bytes=1048576"):
        remote(huge_int)
    with pytest.raises(ValueError, match=r"input of \d+ bytes exceeds max_item_bytes=1048576"):
        remote("é" * (1 << 19))
    assert remote("é" * 1000) == "é" * 1000
    # a client that skips the check: the model process refuses it itself
    bad = raw(name)
    bad.sendall(frame(pickle.dumps([(0, 9, "x" * (2 << 20), None, None)], protocol=5)))
    records = read_records(bad)
    assert records[0][0] == 4 and records[0][1] == 9   # ERROR for call 9
    assert re.search(r"input of 20971\d\d bytes exceeds max_item_bytes=1048576", records[0][4])
    bad.close()
    assert fn.stats().submitted == 1


# ---------------------------------------------------------------- names and their files

def test_the_hashed_form_of_a_long_name_cannot_be_taken_by_another_name():
    import hashlib

    long_name = unique_name("long") + "x" * 150
    digest = hashlib.sha256(long_name.encode()).hexdigest()[:32]
    with make(lambda b: [("long", x) for x in b]) as long_fn, make(lambda b: [("short", x) for x in b]) as short_fn:
        long_fn.share(long_name)
        short_fn.share(f"h-{digest}")
        with connect(long_name, timeout=5) as a, connect(f"h-{digest}", timeout=5) as b:
            assert a(1) == ("long", 1) and b(1) == ("short", 1)
    with pytest.raises(ValueError, match="invalid name value"):
        connect(f"+h-{digest}", timeout=0.1)


def test_files_of_a_name_go_after_close_and_after_a_crash():
    directory = runtime_dir()
    name = unique_name()
    with make(identity) as fn:
        fn.share(name)
        assert os.path.exists(os.path.join(directory, f"{name}.lock"))
    assert not os.path.exists(os.path.join(directory, f"{name}.lock"))
    assert not os.path.exists(os.path.join(directory, f"{name}.sock"))

    crashed = unique_name()
    proc = spawn_owner(crashed)
    proc.kill()
    proc.communicate(timeout=10)
    files = [os.path.join(directory, f"{crashed}.{ext}") for ext in ("sock", "lock")]
    assert all(os.path.exists(f) for f in files)
    with pytest.raises(TimeoutError):
        connect(crashed, timeout=0.2)     # finds a dead owner's files: removes them
    assert not any(os.path.exists(f) for f in files)

    again = unique_name()
    proc = spawn_owner(again)
    proc.kill()
    proc.communicate(timeout=10)
    with make(identity) as fn:
        fn.share(unique_name())           # a share sweeps every dead owner's files
        assert not os.path.exists(os.path.join(directory, f"{again}.lock"))


# ---------------------------------------------------------------- health

def _process_state(pid: int) -> str:
    """The state letter of pid from /proc (T: stopped); a signal takes effect when the kernel delivers it."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_remote_fn_offers_stats_and_health(shared, stopped_owner):
    fn, name, remote = shared(lambda b: [x * 2 for x in b])
    assert remote(1) == 2 and remote(2) == 4
    stats = remote.stats()
    assert stats.submitted == 2 and stats.completed == 2 and stats == fn.stats()
    assert remote.healthy
    fn.close()
    wait_until(lambda: remote.closed, 5, "closed")
    assert not remote.healthy

    stopped, proc = stopped_owner
    far = connect(stopped, timeout=10)
    assert far.healthy
    proc.send_signal(signal.SIGSTOP)
    wait_until(lambda: _process_state(proc.pid) == "T", 5, "the model process stopped")
    assert not far.healthy              # a stopped model process answers nothing in time
    with pytest.raises(TimeoutError, match="did not answer within 0.2s"):
        far.stats(timeout=0.2)
    proc.send_signal(signal.SIGCONT)
    wait_until(lambda: far.healthy, 5, "healthy again")
    far.close()
