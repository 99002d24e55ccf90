"""Cross-process soak: one model process, clients killed and restarted, garbage and stalls mixed in.

A model process shares a function; client processes (threads, asyncio and
futures, some calls with timeouts, some inputs that make the handler fail)
check that every call got exactly its own outcome.  Meanwhile some clients
are SIGKILLed mid-round and replaced, and a chaos thread opens connections
that hang up at once, send garbage, an oversized length prefix, half a frame
(then stall), or valid calls without ever reading the replies.  Reports
calls, lost / mis-routed / duplicated outcomes, and the model process's file
descriptors and threads at the start, their peak, and at the end.  Exits 1
if anything was lost or mis-routed, or fds or threads did not come back.

    PYTHONPATH=python python benchmarks/soak_shared.py --calls 200000   # make soak-shared
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HEADER = struct.Struct("<QQ")
FAIL_EVERY = 97          # inputs whose seq % FAIL_EVERY == 5 make the handler fail that item


# ---------------------------------------------------------------- the model process

def role_owner(name: str) -> None:
    from batched_fn import Failed, batched_fn

    def handler(batch: list) -> list:
        out = []
        for cid, seq, pad in batch:
            out.append(Failed(ValueError(f"injected {cid}:{seq}")) if seq % FAIL_EVERY == 5
                       else (cid, seq, len(pad)))
        return out

    fn = batched_fn(handler, max_batch_size=64, max_delay=0.001, channel_cap=4096)
    fn.share(name)
    print("ready", flush=True)
    sys.stdin.read()   # until the driver closes stdin
    fn.close()
    s = fn.stats()
    print(json.dumps({"submitted": s.submitted, "completed": s.completed, "failed": s.failed,
                      "timed_out": s.timed_out, "cancelled": s.cancelled, "rejected": s.rejected,
                      "queued": s.queued, "batches": s.batches}), flush=True)


# ---------------------------------------------------------------- a client process

def role_client(name: str, cid: int, calls: int, seed: int) -> None:
    from batched_fn import Full, connect

    rng = random.Random(seed)
    remote = connect(name, timeout=30)
    tally = {"ok": 0, "failed": 0, "timeout": 0, "full": 0, "misrouted": 0, "lost": 0, "other": 0}
    lock = threading.Lock()

    def pad() -> bytes:
        return b"p" * (rng.choice((0, 8, 100, 2000)) if rng.random() > 0.01 else 60_000)

    def check(seq: int, size: int, get) -> None:
        try:
            out = get()
            key = "ok" if out == (cid, seq, size) else "misrouted"
        except ValueError as exc:
            key = "failed" if str(exc) == f"injected {cid}:{seq}" else "misrouted"
        except TimeoutError:
            key = "timeout"
        except Full:
            key = "full"
        except Exception as exc:   # anything else is reported, never hidden
            key = "other"
            print(f"client {cid}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        with lock:
            tally[key] += 1

    seqs = iter(range(calls))
    per_style = calls // 3

    def blocking_worker(n: int) -> None:
        for _ in range(n):
            seq = next(seqs)
            p = b"" if seq % 7 else b"x" * 10
            # some with a timeout too short to make it: TimeoutError, withdrawn on both sides
            timeout = 0.0005 if seq % 50 == 0 else 0.5 if seq % 5 == 0 else None
            check(seq, len(p), lambda: remote((cid, seq, p), timeout=timeout))

    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(blocking_worker, per_style // 4) for _ in range(4)]:
            f.result()

    async def aio(n: int) -> None:
        done = 0
        while done < n:
            group = []
            for _ in range(min(64, n - done)):
                seq = next(seqs)
                p = pad()
                group.append((seq, len(p), asyncio.ensure_future(
                    remote.acall((cid, seq, p), timeout=0.001 if seq % 40 == 0 else None if seq % 3 else 2.0))))
            for seq, size, fut in group:
                try:
                    await fut
                except BaseException:
                    pass
                check(seq, size, fut.result)
            done += len(group)

    asyncio.run(aio(per_style))
    rest = calls - 4 * (per_style // 4) - per_style
    futs = []
    for _ in range(rest):
        seq = next(seqs)
        p = pad()
        try:
            futs.append((seq, len(p), remote.submit((cid, seq, p))))
        except Exception as exc:
            futs.append((seq, len(p), exc))
        if len(futs) >= 256:
            for s, size, f in futs:
                check(s, size, (lambda e=f: (_ for _ in ()).throw(e)) if isinstance(f, Exception)
                      else (lambda f=f: f.result(timeout=30)))
            futs.clear()
    for s, size, f in futs:
        check(s, size, (lambda e=f: (_ for _ in ()).throw(e)) if isinstance(f, Exception)
              else (lambda f=f: f.result(timeout=30)))
    tally["calls"] = sum(v for k, v in tally.items())
    remote.close()
    print(json.dumps(tally), flush=True)


# ---------------------------------------------------------------- the driver

def proc_counts(pid: int) -> tuple[int, int]:
    """(open fds, threads) of process pid."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def spawn(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


class Chaos(threading.Thread):
    """Misbehaving connections, one every few ms, until stopped."""

    def __init__(self, path: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.held: list[tuple[float, socket.socket]] = []

    def run(self) -> None:
        kinds = ["hangup", "reset", "garbage", "huge", "half", "stall", "no-read"]
        while not self.stop.wait(0.01):
            kind = self.rng.choice(kinds)
            try:
                self.one(kind)
                self.counts[kind] = self.counts.get(kind, 0) + 1
            except OSError:
                self.counts["refused"] = self.counts.get("refused", 0) + 1
            now = time.monotonic()
            for item in [h for h in self.held if h[0] <= now]:
                self.held.remove(item)
                item[1].close()
        for _, s in self.held:
            s.close()

    def one(self, kind: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(self.path)
        if kind == "hangup":
            s.close()
        elif kind == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        elif kind == "garbage":
            s.sendall(os.urandom(self.rng.randrange(1, 4000)))
            self.held.append((time.monotonic() + 0.2, s))
        elif kind == "huge":
            s.sendall(HEADER.pack(1 << 62, 0))
            self.held.append((time.monotonic() + 0.2, s))
        elif kind == "half":
            meta = pickle.dumps([(0, 1, 5, None, None)], protocol=5)
            s.sendall(HEADER.pack(len(meta), 0) + meta[: len(meta) // 2])
            self.held.append((time.monotonic() + self.rng.uniform(0.5, 2.0), s))
        elif kind == "stall":
            self.held.append((time.monotonic() + self.rng.uniform(0.5, 2.0), s))
        else:   # valid calls, replies never read
            records = [(0, i, (9, i, b"q" * 1000), None, None) for i in range(200)]
            meta = pickle.dumps(records, protocol=5)
            s.sendall(HEADER.pack(len(meta), 0) + meta)
            self.held.append((time.monotonic() + self.rng.uniform(0.5, 2.0), s))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="completed client calls to reach")
    ap.add_argument("--clients", type=int, default=4, help="client processes at once")
    ap.add_argument("--round", type=int, default=6_000, help="calls per client process")
    ap.add_argument("--kill-share", type=float, default=0.25, help="share of client rounds SIGKILLed mid-run")
    ap.add_argument("--max-seconds", type=float, default=1200.0, help="give up after this long")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from batched_fn._shared import runtime_dir
    from batched_fn._shared._names import socket_path

    rng = random.Random(args.seed)
    name = f"soak-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    owner_log = tempfile.TemporaryFile("w+")   # its log lines: a pipe nobody reads would stall it
    owner = spawn("owner", name, stderr=owner_log)
    assert owner.stdout is not None
    if owner.stdout.readline().strip() != "ready":
        owner.kill()
        owner.communicate(timeout=10)
        owner_log.seek(0)
        print(owner_log.read(), file=sys.stderr)
        return 1
    from batched_fn import connect
    with connect(name, timeout=30) as warm:   # the worker and the deadline timer start on first use
        assert warm((0, 0, b""), timeout=5.0) == (0, 0, 0)
    time.sleep(0.5)
    base_fds, base_threads = proc_counts(owner.pid)
    peak_fds, peak_threads = base_fds, base_threads
    chaos = Chaos(socket_path(runtime_dir(), name), args.seed)
    t0 = time.monotonic()
    chaos.start()

    totals = {"ok": 0, "failed": 0, "timeout": 0, "full": 0, "misrouted": 0, "lost": 0, "other": 0, "calls": 0}
    rounds = killed = next_cid = 0
    running: list[tuple[subprocess.Popen, float | None]] = []
    problems: list[str] = []
    while (totals["calls"] < args.calls or running) and time.monotonic() - t0 < args.max_seconds:
        while totals["calls"] + len(running) * args.round < args.calls and len(running) < args.clients:
            next_cid += 1
            kill_at = time.monotonic() + rng.uniform(0.3, 2.0) if rng.random() < args.kill_share else None
            running.append((spawn("client", name, str(next_cid), str(args.round), str(rng.randrange(1 << 30))),
                            kill_at))
        time.sleep(0.05)
        fds, threads = proc_counts(owner.pid)
        peak_fds, peak_threads = max(peak_fds, fds), max(peak_threads, threads)
        for item in list(running):
            proc, kill_at = item
            if kill_at is not None and proc.poll() is None and time.monotonic() >= kill_at:
                proc.send_signal(signal.SIGKILL)
            if proc.poll() is None:
                continue
            running.remove(item)
            out, err = proc.communicate()
            if proc.returncode == -signal.SIGKILL:
                killed += 1
                continue
            rounds += 1
            try:
                tally = json.loads(out.strip().splitlines()[-1])
            except (IndexError, ValueError):
                problems.append(f"client exited {proc.returncode} without a tally: {err[-2000:]}")
                continue
            for k in totals:
                totals[k] += tally.get(k, 0)
            if tally["calls"] != args.round:
                totals["lost"] += args.round - tally["calls"]
            if err.strip():
                problems.append(err.strip()[-2000:])
    elapsed = time.monotonic() - t0
    chaos.stop.set()
    chaos.join(10)
    # the model process's fds and threads come back once every client is gone
    deadline = time.monotonic() + 10
    while True:
        end_fds, end_threads = proc_counts(owner.pid)
        if (end_fds <= base_fds and end_threads <= base_threads) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    alive = owner.poll() is None
    out, _ = owner.communicate(input="", timeout=60)
    owner_log.seek(0)
    err = owner_log.read()
    owner_stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    report = {
        "calls_checked": totals["calls"], "ok": totals["ok"], "failed_as_injected": totals["failed"],
        "timeouts": totals["timeout"], "full": totals["full"], "lost": totals["lost"],
        "misrouted": totals["misrouted"], "other_errors": totals["other"],
        "client_rounds_completed": rounds, "client_rounds_killed": killed,
        "chaos_connections": chaos.counts, "seconds": round(elapsed, 1),
        "calls_per_s": round(totals["calls"] / elapsed) if elapsed else 0,
        "model_fds": {"start": base_fds, "peak": peak_fds, "end": end_fds},
        "model_threads": {"start": base_threads, "peak": peak_threads, "end": end_threads},
        "model_alive_at_end": alive, "model_stats": owner_stats,
        "model_log_lines": len([line for line in err.splitlines() if "batched_fn" in line]),
    }
    print(json.dumps(report, indent=2))
    for p in problems[:5]:
        print("problem:", p, file=sys.stderr)
    bad = (totals["lost"] or totals["misrouted"] or totals["other"] or not alive or end_fds > base_fds
           or end_threads > base_threads or totals["calls"] < args.calls)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "owner":
        role_owner(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        role_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
