"""batched_fn and the naive batcher on a free-threaded CPython, GIL off and on, beside a regular CPython.

    python benchmarks/bench_free_threading.py [--ft-python PATH] [--gil-python PATH]
                                              [--rounds 3] [--duration 1.0] [--out FILE]

One run measures, for each interpreter setting -- 3.13t with the GIL off
(``PYTHON_GIL=0``), the same 3.13t with ``PYTHON_GIL=1``, and a regular
CPython (3.11 here) -- a no-op handler driven by 64 threads, by 1024 asyncio
tasks, and by one thread alone (its p50 latency), for batched_fn and for the
naive batcher (benchmarks/naive.py).  Each round runs every setting once, in
its own process, settings interleaved; the table shows the median of the
rounds and the ratios the targets are about.  batched_fn is imported from
``python/`` (build it in place for each interpreter first: ``make
bench-ft`` does).  ``--child`` is the per-process part.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_BATCH = 32
MAX_DELAY = 0.001


def noop(batch: list) -> list:
    return batch


def child(duration: float) -> dict:
    """Runs in the measured interpreter: every cell for both peers, printed as JSON."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "python"))
    import peers as P
    from loadgen import run_tasks, run_threads

    def threads(peer: str, n: int, delay: float = MAX_DELAY) -> dict:
        ad = P.make(peer, noop, MAX_BATCH, delay)
        try:
            run_threads(ad.call, n, min(0.2, duration / 4))
            res = run_threads(ad.call, n, duration)
        finally:
            ad.close()
        res.pop("latencies")
        return res

    def tasks(peer: str, n: int) -> dict:
        async def go() -> dict:
            ad = P.make(peer, noop, MAX_BATCH, MAX_DELAY)
            try:
                await run_tasks(ad.acall, n, min(0.2, duration / 4))
                return await run_tasks(ad.acall, n, duration)
            finally:
                await ad.aclose()
        res = asyncio.run(go())
        res.pop("latencies")
        return res

    out: dict = {"gil": getattr(sys, "_is_gil_enabled", lambda: True)(), "version": sys.version.split()[0],
                 "free_threaded_build": bool(__import__("sysconfig").get_config_var("Py_GIL_DISABLED"))}
    for peer in ("batched_fn", "naive"):
        out[f"{peer}/threads64"] = threads(peer, 64)
        out[f"{peer}/asyncio1024"] = tasks(peer, 1024)
        # alone, a caller would wait max_delay for company each call: measured at max_delay=0,
        # this is the cost of one call through the batcher
        out[f"{peer}/thread1"] = threads(peer, 1, 0.0)
    import batched_fn
    out["batched_fn_file"] = batched_fn._batchcore.__file__
    return out


def run_child(python: str, env_extra: dict, duration: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON_GIL", "PYTHONPATH")}
    env.update(env_extra)
    proc = subprocess.run([python, __file__, "--child", "--duration", str(duration)], capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{python} {env_extra} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ft-python", default=str(ROOT / "build/venv-ft/bin/python"),
                    help="a free-threaded CPython (3.13t) with batched_fn built in place for it")
    ap.add_argument("--gil-python", default=str(ROOT / ".venv/bin/python"), help="a regular CPython")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--out", default=str(HERE / "results_free_threading.md"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.duration)))
        return 0

    settings = [("3.13t, GIL off", args.ft_python, {"PYTHON_GIL": "0"}),
                ("3.13t, PYTHON_GIL=1", args.ft_python, {"PYTHON_GIL": "1"}),
                ("regular", args.gil_python, {})]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, py, env in settings:
            runs[name].append(run_child(py, env, args.duration))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])

    def med(name: str, cell: str, key: str) -> float:
        return statistics.median(run[cell][key] for run in runs[name])

    versions = {name: runs[name][0]["version"] for name in runs}
    for name, _, _ in settings[:2]:
        assert runs[name][0]["free_threaded_build"], f"{name}: not a free-threaded interpreter"
    assert not runs[settings[0][0]][0]["gil"], "the GIL is on with PYTHON_GIL=0: batched_fn re-enabled it?"
    settings[2] = (f"{versions['regular']} (regular)",) + settings[2][1:]
    runs[settings[2][0]] = runs.pop("regular")
    names = [s[0] for s in settings]
    rows = []
    for name in names:
        t64, n64 = med(name, "batched_fn/threads64", "rps"), med(name, "naive/threads64", "rps")
        a1k, n1k = med(name, "batched_fn/asyncio1024", "rps"), med(name, "naive/asyncio1024", "rps")
        p50 = med(name, "batched_fn/thread1", "p50")
        rows.append((name, t64, n64, a1k, n1k, p50, med(name, "naive/thread1", "p50")))
    ft, ftgil, reg = rows
    date = datetime.date.today().isoformat()
    cmd = "python benchmarks/bench_free_threading.py" + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
    lines = [
        f"# Free-threaded CPython: batched_fn vs the naive batcher ({date})",
        "",
        f"`{cmd}` (`make bench-ft`); {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end (a shared machine).  No-op handler, "
        f"max_batch_size={MAX_BATCH}, max_delay={MAX_DELAY} (the lone thread: max_delay=0); "
        f"median of {args.rounds} rounds of {args.duration:g} s, settings interleaved.",
        "",
        "| interpreter | 64 threads calls/s | naive | x naive | 1024 asyncio tasks calls/s | naive | x naive "
        "| lone thread p50 | naive p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t64, n64, a1k, n1k, p50, np50 in rows:
        lines.append(f"| {name} | {t64:,.0f} | {n64:,.0f} | {t64 / n64:.1f}x | {a1k:,.0f} | {n1k:,.0f} | "
                     f"{a1k / n1k:.1f}x | {p50 * 1e6:.0f} us | {np50 * 1e6:.0f} us |")
    lines += [
        "",
        "Targets:",
        f"- 64 threads, GIL off: {ft[1] / ft[2]:.1f}x the naive batcher (target >= 6x) and "
        f"{ft[1] / ftgil[1]:.1f}x the same interpreter with PYTHON_GIL=1 (target >= 2x)",
        f"- 1024 asyncio tasks, GIL off: {ft[3] / ft[4]:.1f}x the naive batcher (target >= 4x)",
        f"- lone thread call p50, GIL off: {ft[5] * 1e6:.0f} us against {reg[5] * 1e6:.0f} us on "
        f"{versions['regular']} ({(ft[5] / reg[5] - 1) * 100:+.0f} %; target no worse than +25 %)",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
