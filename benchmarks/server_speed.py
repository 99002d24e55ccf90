"""The example server vs a minimal FastAPI app over the same batcher, driven by wrk.

Both serve the toy model (2 ms + 50 µs per input, batch 32, delay 5 ms) on
127.0.0.1.  Both run at once; at each connection count they take turns (the
order alternating between rounds), so a noisy machine slows both alike.  Prints
requests/s, p99 latency and server CPU time per request for each, the medians
of the rounds, and the throughput ratio example/minimal::

    apt-get install -y wrk
    .venv/bin/python benchmarks/server_speed.py                    # 64 and 256 connections, 5 s, 2 rounds
    .venv/bin/python benchmarks/server_speed.py --connections 16,64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

from batched_fn.examples.ready import READY

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = ["--toy-batch-ms", "2", "--toy-item-ms", "0.05", "--max-batch-size", "32", "--max-delay", "0.005"]
SERVERS = {
    "example": [sys.executable, "-m", "batched_fn.examples.server", "--model", "toy", "--port", "0", *MODEL],
    "minimal": [sys.executable, os.path.join(HERE, "minimal_fastapi_app.py"), "--port", "0", *MODEL],
}


class Served:
    """A server subprocess that printed its ready line; ``stop()`` sends SIGTERM."""

    def __init__(self, argv: Sequence[str], ready_timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.url, self.lines, ready = "", [], threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                match = READY.search(line)
                if match:
                    self.url = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(ready_timeout) or not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Run:
    """One wrk run against one server."""

    rps: float
    p99_ms: float
    cpu_pct: float
    errors: int

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per answered request."""
        return self.cpu_pct * 1e4 / self.rps if self.rps else float("nan")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(server: Served, connections: int, seconds: int, threads: int) -> Run:
    """Run wrk (POST /embed via embed_post.lua) once and parse its report."""
    cpu0 = server.cpu_seconds()
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                          "-s", os.path.join(HERE, "embed_post.lua"), server.url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    cpu = server.cpu_seconds() - cpu0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Run(rps, float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
               100.0 * cpu / seconds, errors)


def main(argv: Sequence[str] | None = None) -> None:
    """Start both servers, measure them in turns, print the medians side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", default="64,256", help="comma-separated wrk connection counts")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server and count; the median is kept")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    levels = [int(c) for c in args.connections.split(",")]
    servers = {name: Served(argv_) for name, argv_ in SERVERS.items()}
    runs: dict[tuple[str, int], list[Run]] = {}
    try:
        for round_ in range(args.rounds):
            for level in levels:
                names = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for name in names:
                    run = wrk(servers[name], level, args.seconds, args.threads)
                    runs.setdefault((name, level), []).append(run)
                    print(f"  round {round_ + 1} {name:<8} {level:>4} conns: {run.rps:8.0f} req/s  "
                          f"p99 {run.p99_ms:6.1f} ms  cpu {run.cpu_pct:4.0f}%  errors {run.errors}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def med(name: str, level: int, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[(name, level)])

    print(f"\nmedians of {args.rounds} rounds, {args.seconds} s each, wrk -t{args.threads}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("cpu/req: server CPU time per answered request, the steadiest figure on a shared machine")
    print(f"{'conns':>5} | {'example req/s':>13} {'minimal req/s':>13} {'ratio':>6} | "
          f"{'example p99':>11} {'minimal p99':>11} | {'example cpu/req':>15} {'minimal cpu/req':>15} | errors")
    for level in levels:
        e, m = med("example", level, "rps"), med("minimal", level, "rps")
        errors = sum(r.errors for key, rs in runs.items() if key[1] == level for r in rs)
        print(f"{level:>5} | {e:>13.0f} {m:>13.0f} {e / m:>6.2f} | {med('example', level, 'p99_ms'):>8.1f} ms "
              f"{med('minimal', level, 'p99_ms'):>8.1f} ms | {med('example', level, 'cpu_us'):>12.0f} us "
              f"{med('minimal', level, 'cpu_us'):>12.0f} us | {errors}")


if __name__ == "__main__":
    main()
