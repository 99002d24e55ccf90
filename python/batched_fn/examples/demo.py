"""The README's demo: batching vs one request at a time, on a real embedding server.

It starts the example server twice on 127.0.0.1 (free ports), once per mode,
drives each with the bundled load generator at several concurrencies (the
modes taking turns at each level), reads the mean batch size from ``/stats``,
and stops both servers.  Then it prints a table and
writes a PNG plot::

    python -m batched_fn.examples.demo                 # all-MiniLM-L6-v2, ~2-3 minutes on 2 cores
    python -m batched_fn.examples.demo --model toy     # seconds, no torch

The comparison is fair: both modes are the same server process, model, HTTP
path and client; only ``--max-batch-size`` differs (N vs 1), so "one at a
time" still queues requests and runs the model on one input per call.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import httpx

from .loadgen import LoadResult, run_load_sync, sample_texts

__all__ = ["Row", "run_modes", "print_table", "plot", "main"]

READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")


@dataclass
class Row:
    """One measured point: a mode at a concurrency."""

    mode: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    errors: int


class ServerProcess:
    """The example server in a subprocess, on a free port; always stopped by ``stop()``.

    Raises RuntimeError (with the server's output) if it does not print its
    address within ready_timeout seconds.
    """

    def __init__(self, args: Sequence[str], ready_timeout: float) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "batched_fn.examples.server", "--host", "127.0.0.1",
                                      "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = ""
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(ready_timeout) or not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()   # exited

    @property
    def output(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (then SIGKILL after timeout seconds); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _batched_items(url: str) -> tuple[float, int]:
    stats = httpx.get(url + "/stats", timeout=30).json()
    return stats["mean_batch_size"] * stats["batches"], stats["batches"]


def _measure(mode: str, server: ServerProcess, level: int, duration: float, texts: Sequence[str]) -> Row:
    url = server.url + "/embed"
    items0, batches0 = _batched_items(server.url)
    result: LoadResult = run_load_sync(url, level, duration=duration, texts=texts)
    items1, batches1 = _batched_items(server.url)
    batches = batches1 - batches0
    errors = result.transport_errors + sum(n for s, n in result.statuses.items() if s != 200)
    print(f"  {mode:<14} concurrency {level:>3}: {result.rps:8.1f} req/s", flush=True)
    return Row(mode, level, result.rps, result.percentile(0.5) * 1e3, result.percentile(0.99) * 1e3,
               (items1 - items0) / batches if batches else 0.0, errors)


def run_modes(modes: dict[str, Sequence[str]], levels: Sequence[int], duration: float,
              ready_timeout: float = 300.0) -> list[Row]:
    """Start one server per mode (name -> server args), measure each level on each, stop them all.

    The modes take turns at every level (the order alternating), so a slow
    spell on a shared machine hits both sides instead of one.
    """
    servers: dict[str, ServerProcess] = {}
    rows: list[Row] = []
    texts = sample_texts(1024, seed=1)
    try:
        for mode, args in modes.items():
            servers[mode] = ServerProcess(args, ready_timeout)
        for mode, server in servers.items():     # warm up, not measured
            run_load_sync(server.url + "/embed", max(levels), duration=min(1.0, duration), texts=texts)
        for i, level in enumerate(levels):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for mode in order:
                rows.append(_measure(mode, servers[mode], level, duration, texts))
    finally:
        codes = {mode: server.stop() for mode, server in servers.items()}
    for mode, code in codes.items():
        if code != 0:
            raise RuntimeError(f"the {mode} server exited with {code}:\n" + "".join(servers[mode].lines))
    order = {mode: i for i, mode in enumerate(modes)}
    return sorted(rows, key=lambda r: (order[r.mode], r.concurrency))


def print_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width table (also returned)."""
    lines = [f"{'mode':<14} {'conc':>5} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>11} {'errors':>7}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r.mode:<14} {r.concurrency:>5} {r.rps:>9.1f} {r.p50_ms:>9.1f} {r.p99_ms:>9.1f} "
                     f"{r.mean_batch:>11.2f} {r.errors:>7}")
    table = "\n".join(lines)
    print(table)
    return table


def plot(rows: Sequence[Row], path: str, title: str) -> None:
    """Throughput and p99 latency against concurrency, one line per mode, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(dict.fromkeys(r.mode for r in rows)):
        mine = [r for r in rows if r.mode == mode]
        xs = [r.concurrency for r in mine]
        color = f"C{i}"
        ax_rps.plot(xs, [r.rps for r in mine], marker="o", color=color, label=mode)
        ax_lat.plot(xs, [r.p99_ms for r in mine], marker="o", color=color, label=f"{mode} p99")
        ax_lat.plot(xs, [r.p50_ms for r in mine], marker=".", linestyle="--", color=color, label=f"{mode} p50")
    levels = sorted({r.concurrency for r in rows})
    for ax, ylabel in ((ax_rps, "requests/s (higher is better)"), (ax_lat, "latency ms (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_lat.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both modes, print the table, write the plot."""
    parser = argparse.ArgumentParser(prog="python -m batched_fn.examples.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm (default) or toy")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per concurrency level")
    parser.add_argument("--max-batch-size", type=int, default=32, help="batch size of the batched mode")
    parser.add_argument("--max-delay", type=float, default=0.005, help="max_delay of the batched mode (seconds)")
    parser.add_argument("--out", default="demo-results.png", help="where to write the plot")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    common = ["--model", args.model, "--channel-cap", str(4 * max(levels)), "--timeout", "60"]
    if args.model == "toy":   # a model whose batches are cheaper than their items
        common += ["--toy-batch-ms", "4", "--toy-item-ms", "0.2"]
    started = time.monotonic()
    print(f"batched_fn demo: model={args.model}, concurrency {levels}, {args.duration:g}s per level", flush=True)
    rows = run_modes({
        "batched": common + ["--max-batch-size", str(args.max_batch_size), "--max-delay", str(args.max_delay)],
        "one-at-a-time": common + ["--max-batch-size", "1", "--max-delay", "0"],
    }, levels, args.duration)
    print()
    print_table(rows)
    best = {m: max(r.rps for r in rows if r.mode == m) for m in ("batched", "one-at-a-time")}
    if best["one-at-a-time"] > 0:
        print(f"\nbest throughput: batched {best['batched']:.1f} req/s vs one-at-a-time "
              f"{best['one-at-a-time']:.1f} req/s ({best['batched'] / best['one-at-a-time']:.1f}x)")
    plot(rows, args.out, f"batched_fn embedding server ({args.model}, max_batch_size={args.max_batch_size} vs 1)")
    print(f"plot written to {os.path.abspath(args.out)}  (total {time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
