"""The README's demo: batching vs one request at a time, on a real embedding server.

It starts the example server once per mode on 127.0.0.1 (free ports):
``auto`` (batches, ``max_delay="auto"``), ``fixed-5ms`` (batches with a fixed
``--fixed-delay``) and ``one-at-a-time``; with ``--workers 2`` (the default),
also "2 workers, one shared model" (``--workers 2``: two HTTP worker
processes, one model process) and "2 workers, a model each" (``--workers 2
--no-share``), both batching as ``auto``.  It drives each with the bundled
load generator at several concurrencies (closed loop) and, with
``--rate``, at open-loop Poisson rates (latency from the scheduled send
time), the modes taking turns at each level; reads the mean batch size from
``/stats`` and stops the servers.  Then it prints a table and, when matplotlib
is installed, writes a PNG plot::

    python -m batched_fn.examples.demo                 # all-MiniLM-L6-v2, ~3-4 minutes on 2 cores
    python -m batched_fn.examples.demo --model toy     # ~15 s, no torch (1 s per level, 3 levels)
    python -m batched_fn.examples.demo --model toy --rate 100,400

The comparison is fair: every mode is the same server process, model, HTTP
path and client; only ``--max-batch-size`` (N vs 1) and ``--max-delay``
differ, so "one at a time" still queues requests and runs the model on one
input per call.  The table also shows the total RSS of each server's
processes (Linux; RSS summed per process, so shared pages count once per
process).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import httpx

from .loadgen import LoadResult, run_load_sync, run_open_load_sync, sample_texts
from .ready import READY

__all__ = ["Row", "run_modes", "print_table", "plot", "server_accepts_auto", "server_accepts_buckets", "tree_rss_mb",
           "main"]

#: width of the mode column
WIDTH = 27
SHARED_MODE = "2 workers, one shared model"
EACH_MODE = "2 workers, a model each"
BUCKETS_MODE = "auto, length buckets"
#: the example server's flag that turns on length buckets (batch_key=models.length_key(model))
BUCKETS_FLAG = "--length-buckets"


@dataclass
class Row:
    """One measured point: a mode at a concurrency (closed loop) or a rate (open loop, concurrency 0)."""

    mode: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    errors: int
    rate: float = 0.0
    rss_mb: float = 0.0

    @property
    def load(self) -> str:
        """The load as the table shows it: clients, or requests/s offered."""
        return f"{self.rate:g}/s" if self.rate else str(self.concurrency)


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


def _batched_items(url: str, batchers: int = 1) -> tuple[float, int]:
    """Items and batches so far, summed over batchers distinct batchers.

    With ``--workers N --no-share`` each HTTP worker has its own batcher; a
    fresh connection lands on any worker, so /stats is asked until every
    worker (by its pid) has answered, within a bound.
    """
    seen: dict[int, tuple[float, int]] = {}
    for _ in range(100 * batchers):
        stats = httpx.get(url + "/stats", timeout=30).json()
        seen[stats.get("pid", 0)] = (stats["mean_batch_size"] * stats["batches"], stats["batches"])
        if len(seen) >= batchers:
            break
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


def tree_rss_mb(pid: int) -> float:
    """Total RSS (MB) of pid and its descendants, from /proc; 0.0 where there is no /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return 0.0
    for entry in entries:
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            parents[int(entry)] = int(fields["PPid"])
            rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
        except (OSError, KeyError, ValueError):
            continue
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sum(rss.get(p, 0) for p in family) * 1024 / 1e6


def _measure(mode: str, server: ServerProcess, level: int | float, duration: float, texts: Sequence[str],
             batchers: int = 1) -> Row:
    """level: an int is closed-loop clients, a float an open-loop rate (requests/s)."""
    url = server.url + "/embed"
    items0, batches0 = _batched_items(server.url, batchers)
    if isinstance(level, float):
        result: LoadResult = run_open_load_sync(url, level, duration=duration, texts=texts)
        print(f"  {mode:<{WIDTH}} open loop {level:>6g}/s: {result.rps:8.1f} req/s", flush=True)
    else:
        result = run_load_sync(url, level, duration=duration, texts=texts)
        print(f"  {mode:<{WIDTH}} concurrency {level:>3}: {result.rps:8.1f} req/s", flush=True)
    rss = tree_rss_mb(server.proc.pid)
    items1, batches1 = _batched_items(server.url, batchers)
    batches = batches1 - batches0
    errors = result.transport_errors + sum(n for s, n in result.statuses.items() if s != 200)
    return Row(mode, result.concurrency, result.rps, result.percentile(0.5) * 1e3, result.percentile(0.99) * 1e3,
               (items1 - items0) / batches if batches else 0.0, errors, result.rate, rss)


def _batchers(args: Sequence[str]) -> int:
    """How many batchers a server started with args has: one per worker with --no-share, else one."""
    args = list(args)
    if "--no-share" in args and "--workers" in args:
        return int(args[args.index("--workers") + 1])
    return 1


def run_modes(modes: dict[str, Sequence[str]], levels: Sequence[int | float], duration: float,
              ready_timeout: float = 300.0) -> list[Row]:
    """Start one server per mode (name -> server args), measure each level on each, stop them all.

    levels: ints are closed-loop client counts, floats open-loop rates.  The
    modes take turns at every level (the order rotating), so a slow spell on
    a shared machine hits every side instead of one.
    """
    servers: dict[str, ServerProcess] = {}
    rows: list[Row] = []
    texts = sample_texts(1024, seed=1)
    try:
        for mode, args in modes.items():
            servers[mode] = ServerProcess(args, ready_timeout)
        clients = [lv for lv in levels if isinstance(lv, int)] or [8]
        for mode, server in servers.items():     # warm up, not measured
            run_load_sync(server.url + "/embed", max(clients), duration=min(1.0, duration), texts=texts)
        names = list(servers)
        for i, level in enumerate(levels):
            k = i % len(names)
            for mode in names[k:] + names[:k]:
                rows.append(_measure(mode, servers[mode], level, duration, texts, _batchers(modes[mode])))
    finally:
        codes = {mode: server.stop() for mode, server in servers.items()}
    for mode, code in codes.items():
        if code != 0:
            raise RuntimeError(f"the {mode} server exited with {code}:\n" + "".join(servers[mode].lines))
    order = {mode: i for i, mode in enumerate(modes)}
    return sorted(rows, key=lambda r: (order[r.mode], r.rate, r.concurrency))


def print_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width table (also returned)."""
    lines = [f"{'mode':<{WIDTH}} {'load':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>11} "
             f"{'errors':>7} {'RSS MB':>7}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        rss = f"{r.rss_mb:.0f}" if r.rss_mb else "n/a"
        lines.append(f"{r.mode:<{WIDTH}} {r.load:>7} {r.rps:>9.1f} {r.p50_ms:>9.1f} {r.p99_ms:>9.1f} "
                     f"{r.mean_batch:>11.2f} {r.errors:>7} {rss:>7}")
    lines.append("load: closed-loop clients, or an open-loop rate (requests/s; latency from the scheduled send)")
    lines.append("RSS MB: total resident memory of the server's processes after that load")
    table = "\n".join(lines)
    print(table)
    return table


def plot(rows: Sequence[Row], path: str, title: str) -> bool:
    """Throughput and latency against concurrency (closed loop), one line per mode, into a PNG;
    with open-loop rows, a third panel of latency against the offered rate.  False (and a
    message) when matplotlib is not installed: the table is the result, the plot an extra."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or the [bench] extra)", flush=True)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opened = [r for r in rows if r.rate]
    rows = [r for r in rows if not r.rate]
    fig, axes = plt.subplots(1, 3 if opened else 2, figsize=(15 if opened else 10, 4))
    ax_rps, ax_lat = axes[0], axes[1]
    if opened:
        ax_open = axes[2]
        for i, mode in enumerate(dict.fromkeys(r.mode for r in opened)):
            mine = [r for r in opened if r.mode == mode]
            ax_open.plot([r.rate for r in mine], [r.p50_ms for r in mine], marker="o", color=f"C{i}",
                         label=f"{mode} p50")
            ax_open.plot([r.rate for r in mine], [r.p99_ms for r in mine], marker=".", linestyle="--",
                         color=f"C{i}", label=f"{mode} p99")
        ax_open.set_xlabel("offered requests/s (open loop, Poisson)")
        ax_open.set_ylabel("latency ms from scheduled send")
        ax_open.set_yscale("log")
        ax_open.grid(True, alpha=0.3)
        ax_open.legend(fontsize=7)
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
    return True


def server_accepts_auto() -> bool:
    """Whether the example server takes ``--max-delay auto`` (it parses its flags without starting)."""
    from . import server

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            config = server.parse_config(["--max-delay", "auto"], env={})
    except SystemExit:
        return False
    return getattr(config, "max_delay", None) == "auto"


def server_accepts_buckets() -> bool:
    """Whether the example server takes ``--length-buckets`` (it parses its flags without starting)."""
    from . import server

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            config = server.parse_config([BUCKETS_FLAG], env={})
    except SystemExit:
        return False
    return bool(getattr(config, "length_buckets", False))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the modes, print the table, write the plot."""
    parser = argparse.ArgumentParser(prog="python -m batched_fn.examples.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm (default) or toy")
    parser.add_argument("--concurrency", help="comma-separated client counts (default 1,8,32,64; toy: 1,8,32)")
    parser.add_argument("--duration", type=float, help="seconds per concurrency level (default 6; toy: 1)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="batch size of the batched mode")
    parser.add_argument("--fixed-delay", type=float, default=0.005,
                        help="max_delay (seconds) of the fixed-delay mode shown beside auto")
    parser.add_argument("--workers", type=int,
                        help="also measure N HTTP workers sharing one model and N workers with a model each "
                             "(1: leave those rows out; default 2, toy: 1)")
    parser.add_argument("--rate", default="", help="comma-separated open-loop rates (requests/s) to measure too")
    parser.add_argument("--out", default="demo-results.png", help="where to write the plot")
    args = parser.parse_args(argv)
    # The toy model is the quick look (about 15 s on 2 cores); minilm the full comparison.
    quick = args.model == "toy"
    args.concurrency = args.concurrency or ("1,8,32" if quick else "1,8,32,64")
    args.duration = args.duration if args.duration is not None else (1.0 if quick else 6.0)
    args.workers = args.workers if args.workers is not None else (1 if quick else 2)
    levels: list[int | float] = [int(c) for c in args.concurrency.split(",")]
    levels += [float(r) for r in args.rate.split(",") if r]
    clients = max([lv for lv in levels if isinstance(lv, int)], default=8)
    common = ["--model", args.model, "--channel-cap", str(max(256, 4 * clients)), "--timeout", "60"]
    if args.model == "toy":   # a model whose batches are cheaper than their items
        common += ["--toy-batch-ms", "4", "--toy-item-ms", "0.2"]
    started = time.monotonic()
    print(f"batched_fn demo: model={args.model}, concurrency {levels}, {args.duration:g}s per level", flush=True)
    batched = common + ["--max-batch-size", str(args.max_batch_size)]
    modes: dict[str, Sequence[str]] = {}
    if server_accepts_auto():
        modes["auto"] = batched + ["--max-delay", "auto"]
    else:
        print("note: this example server does not take --max-delay auto; the auto mode is left out", flush=True)
    fixed = f"fixed-{args.fixed_delay * 1e3:g}ms"
    modes[fixed] = batched + ["--max-delay", str(args.fixed_delay)]
    modes["one-at-a-time"] = common + ["--max-batch-size", "1", "--max-delay", "0"]
    if server_accepts_buckets():   # texts of similar token counts share batches
        modes[BUCKETS_MODE] = batched + ["--max-delay", "auto", BUCKETS_FLAG]
    if args.workers > 1:
        many = batched + ["--max-delay", "auto", "--workers", str(args.workers)]
        modes[SHARED_MODE.replace("2", str(args.workers), 1)] = many
        modes[EACH_MODE.replace("2", str(args.workers), 1)] = many + ["--no-share"]
    rows = run_modes(modes, levels, args.duration)
    print()
    print_table(rows)
    best = {m: max(r.rps for r in rows if r.mode == m) for m in modes}
    if best["one-at-a-time"] > 0:
        for mode in modes:
            if mode != "one-at-a-time":
                print(f"\nbest throughput: {mode} {best[mode]:.1f} req/s vs one-at-a-time "
                      f"{best['one-at-a-time']:.1f} req/s ({best[mode] / best['one-at-a-time']:.1f}x)")
    title = f"batched_fn embedding server ({args.model}, max_batch_size={args.max_batch_size} vs 1)"
    if plot(rows, args.out, title):
        print(f"plot written to {os.path.abspath(args.out)}")
    print(f"total {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
