"""Cross-process batching: N client processes calling one model process.

    python benchmarks/bench_shared.py [--seconds S] [--rounds R] [--json FILE]

Scenarios, every one in the same run, peers interleaved by round, medians kept:

1. throughput: a no-op handler in one model process; 2 client processes x 256
   asyncio tasks (uvloop) in a closed loop: total req/s, and the same load
   in one process calling the BatchedFn itself (in-process reference).
2. lone call: one client, one call at a time, ``max_delay=0``: round-trip
   p50/p99, next to the same call in-process.
3. shared vs a model each: a toy model (2 ms + 50 us per item, a 200 MB
   weight array) in one process with the whole load, shared by 2 client
   processes with half each, or loaded by each of 2 processes with half
   each; the same total open-loop load (--rate calls/s); mean batch,
   latency and the total RSS of the processes involved.

4. transport: the bare round trip of a 40-byte message between two Python
   processes, over a Unix socket pair and over two shared-memory rings with
   futex wake-ups (batched_fn._batchcore.ShmRing); what the data path alone costs.

Runs this tree's package (``make compile`` first).  Every load loop is bounded in time; processes run
on this machine only (Unix sockets, no network).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "python"))   # this tree's package (built in place: make compile), as the roles use

TOY_FIXED_S = 0.002
TOY_PER_ITEM_S = 50e-6
WEIGHT_MB = 200


# ---------------------------------------------------------------- roles (subprocesses)

def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _toy_model():
    import numpy as np
    weights = np.ones(WEIGHT_MB << 17)   # WEIGHT_MB MiB of float64, touched
    return weights


def _toy_handler(batch: list, model=None) -> list:
    time.sleep(TOY_FIXED_S + TOY_PER_ITEM_S * len(batch))
    return batch


def _noop(batch: list) -> list:
    return batch


def role_owner(name: str, kind: str, max_batch: int, max_delay: float) -> None:
    """Share a function under name until stdin closes; print its stats as JSON then."""
    from batched_fn import batched_fn
    if kind == "toy":
        fn = batched_fn(_toy_handler, max_batch_size=max_batch, max_delay=max_delay, context={"model": _toy_model})
        fn.start()
    else:
        fn = batched_fn(_noop, max_batch_size=max_batch, max_delay=max_delay)
    fn.share(name)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            st = fn.stats()
            print(json.dumps({"batches": st.batches, "mean_batch": st.mean_batch_size,
                              "completed": st.completed, "rss_mb": _rss_mb(os.getpid())}), flush=True)
    fn.close()


async def _drive(call, tasks: int, seconds: float) -> tuple[int, list[float]]:
    end = time.perf_counter() + seconds
    lat: list[float] = []
    count = 0

    async def one(i: int) -> None:
        nonlocal count
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            await call(i)
            lat.append(time.perf_counter() - t0)
            count += 1

    await asyncio.gather(*(one(i) for i in range(tasks)))
    return count, lat


async def _drive_rate(call, rate: float, seconds: float) -> tuple[int, list[float]]:
    """Open loop: start calls at rate per second (at most 4096 in flight), whatever their latency."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    lat: list[float] = []
    inflight: set = set()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t0)

    launched = 0
    while (now := loop.time() - start) < seconds:
        due = int(now * rate)
        while launched < due and len(inflight) < 4096:
            t = asyncio.ensure_future(one(launched))
            inflight.add(t)
            t.add_done_callback(inflight.discard)
            launched += 1
        await asyncio.sleep(0.0005)
    if inflight:
        await asyncio.wait(inflight, timeout=30)
    return len(lat), lat


def role_load(target: str, tasks: int, seconds: float, kind: str, start_at: float) -> None:
    """Drive target (a shared name, or 'local' for an in-process function) with asyncio tasks.

    tasks > 0: that many tasks in a closed loop; tasks < 0: an open loop of -tasks calls/s.
    """
    import uvloop

    import batched_fn as B
    local = None
    if target.startswith("local"):
        max_batch = int(target.split(":")[1])
        if kind == "toy":
            local = B.batched_fn(_toy_handler, max_batch_size=max_batch, max_delay=0.002,
                                 context={"model": _toy_model})
        else:
            local = B.batched_fn(_noop, max_batch_size=max_batch, max_delay=0.0)
        local.start()
        call = local.acall
    else:
        remote = B.connect(target, timeout=30)
        call = remote.acall
    print("ready", flush=True)
    time.sleep(max(0.0, start_at - time.time()))
    count, lat = uvloop.run(_drive(call, tasks, seconds) if tasks > 0 else _drive_rate(call, -tasks, seconds))
    lat.sort()
    out = {"count": count, "p50": lat[len(lat) // 2] if lat else 0, "p99": lat[int(len(lat) * 0.99)] if lat else 0,
           "rss_mb": _rss_mb(os.getpid())}
    if local is not None:
        st = local.stats()
        out.update(mean_batch=st.mean_batch_size)
        local.close()
    print(json.dumps(out), flush=True)


def role_lone(target: str, n: int) -> None:
    """One call at a time from one thread: round-trip latencies."""
    import batched_fn as B
    if target == "local":
        fn = B.batched_fn(_noop, max_batch_size=32, max_delay=0.0)
        call = fn
    else:
        call = B.connect(target, timeout=30)
    for i in range(200):   # warm-up
        call(i)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    print(json.dumps({"p50": lat[n // 2], "p99": lat[int(n * 0.99)]}), flush=True)


# ---------------------------------------------------------------- orchestration

def _spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def _line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise RuntimeError(f"no output from {proc.args} within {timeout}s")
    return proc.stdout.readline().strip()


class Owner:
    def __init__(self, kind: str, max_batch: int, max_delay: float) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:8]}"
        self.proc = _spawn("owner", self.name, kind, str(max_batch), str(max_delay))
        assert _line(self.proc) == "ready"

    def stats(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(_line(self.proc))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def load(targets: list[str], tasks: int, seconds: float, kind: str) -> list[dict]:
    # tasks < 0: each target gets an open loop of -tasks calls/s
    """Run one load process per target at once; their results."""
    start_at = time.time() + 2.0
    procs = [_spawn("load", t, str(tasks), str(seconds), kind, str(start_at)) for t in targets]
    for p in procs:
        assert _line(p) == "ready"
    out = [json.loads(_line(p, seconds + 60)) for p in procs]
    for p in procs:
        p.wait(30)
    return out


def throughput_round(seconds: float) -> dict:
    res = {}
    owner = Owner("noop", 512, 0.0)
    got = load([owner.name, owner.name], 256, seconds, "noop")
    st = owner.stats()
    owner.close()
    res["shared_2x256"] = {"req_s": sum(g["count"] for g in got) / seconds,
                           "p50": statistics.median(g["p50"] for g in got),
                           "p99": max(g["p99"] for g in got), "mean_batch": st["mean_batch"]}
    got = load(["local:512"], 512, seconds, "noop")
    res["inprocess_512"] = {"req_s": got[0]["count"] / seconds, "p50": got[0]["p50"], "p99": got[0]["p99"],
                            "mean_batch": got[0]["mean_batch"]}
    return res


def lone_round(n: int) -> dict:
    owner = Owner("noop", 32, 0.0)
    p = _spawn("lone", owner.name, str(n))
    shared = json.loads(_line(p, 120))
    p.wait(30)
    owner.close()
    p = _spawn("lone", "local", str(n))
    local = json.loads(_line(p, 120))
    p.wait(30)
    return {"shared": shared, "inprocess": local}


def memory_round(seconds: float, rate: int) -> dict:
    """The same total load (rate calls/s, open loop) three ways."""
    owner = Owner("toy", 32, 0.002)
    got = load([owner.name, owner.name], -(rate // 2), seconds, "toy")
    st = owner.stats()
    owner.close()
    shared = {"req_s": sum(g["count"] for g in got) / seconds, "mean_batch": st["mean_batch"],
              "rss_mb": st["rss_mb"] + sum(g["rss_mb"] for g in got), "p50": statistics.median(g["p50"] for g in got),
              "p99": max(g["p99"] for g in got)}
    got = load(["local:32", "local:32"], -(rate // 2), seconds, "toy")
    each = {"req_s": sum(g["count"] for g in got) / seconds,
            "mean_batch": statistics.mean(g["mean_batch"] for g in got),
            "rss_mb": sum(g["rss_mb"] for g in got), "p50": statistics.median(g["p50"] for g in got),
            "p99": max(g["p99"] for g in got)}
    got = load(["local:32"], -rate, seconds, "toy")
    one = {"req_s": got[0]["count"] / seconds, "mean_batch": got[0]["mean_batch"], "rss_mb": got[0]["rss_mb"],
           "p50": got[0]["p50"], "p99": got[0]["p99"]}
    return {"shared_model_2_workers": shared, "model_each_2_workers": each, "one_worker": one}


def _pingpong(kind: str, n: int) -> float:
    """p50 seconds of a 40-byte round trip to a forked echo process over kind ('socket' or 'shm')."""
    import mmap
    import socket as so

    from batched_fn._batchcore import ShmRing, region_size
    msg = b"x" * 40
    if kind == "socket":
        a, b = so.socketpair()
        pid = os.fork()
        if pid == 0:
            a.close()
            while (d := b.recv(100)):
                b.sendall(d)
            os._exit(0)
        b.close()

        def trip() -> None:
            a.sendall(msg)
            a.recv(100)
    else:
        m1, m2 = mmap.mmap(-1, region_size(1 << 16)), mmap.mmap(-1, region_size(1 << 16))
        req, rep_ = ShmRing(m1, create=True), ShmRing(m2, create=True)
        pid = os.fork()
        if pid == 0:
            r_in, r_out = ShmRing(m1), ShmRing(m2)
            while True:
                d = r_in.pop()
                if d is None:
                    r_in.wait(1.0)
                    continue
                if not d:
                    os._exit(0)
                while not r_out.push(d):
                    time.sleep(0)

        def trip() -> None:
            req.push(msg)
            while rep_.pop() is None:
                rep_.wait(1.0)
    lat = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        trip()
        if i >= 200:
            lat.append(time.perf_counter() - t0)
    if kind == "socket":
        a.close()
    else:
        req.push(b"")
    os.waitpid(pid, 0)
    lat.sort()
    return lat[len(lat) // 2]


def transport_round(n: int) -> dict:
    return {"socket_p50": _pingpong("socket", n), "shm_p50": _pingpong("shm", n)}


def _median_dicts(rounds: list[dict]) -> dict:
    first = rounds[0]
    if isinstance(first, dict):
        return {k: _median_dicts([r[k] for r in rounds]) for k in first}
    return statistics.median(rounds)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("owner", "load", "lone"):
        role, args = sys.argv[1], sys.argv[2:]
        if role == "owner":
            role_owner(args[0], args[1], int(args[2]), float(args[3]))
        elif role == "load":
            role_load(args[0], int(args[1]), float(args[2]), args[3], float(args[4]))
        else:
            role_lone(args[0], int(args[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lone", type=int, default=3000)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--rate", type=int, default=2000, help="total calls/s of the memory scenario")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rounds = []
    for _ in range(a.rounds):
        r = {"throughput": throughput_round(a.seconds), "lone": lone_round(a.lone),
             "transport": transport_round(a.lone)}
        if not a.skip_memory:
            r["memory"] = memory_round(a.seconds, a.rate)
        rounds.append(r)
        print(json.dumps(r), flush=True)
    med = _median_dicts(rounds)
    report = {"machine": f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}", "rounds": a.rounds,
              "seconds": a.seconds, "median": med}
    print(json.dumps(report, indent=1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
