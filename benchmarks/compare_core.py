"""Two builds of the core side by side: the figures a core change must not regress.

    python benchmarks/compare_core.py BUILD_A BUILD_B [--rounds 3]

Each BUILD is a directory holding a built ``batched_fn`` package (for example
``build/before`` from an older commit, and ``python`` after ``make compile``).
Every measurement runs in its own subprocess with that build first on
``sys.path``, the builds alternating round by round; the table shows the
median of the rounds and the ratio B/A.  Measured: no-op handler throughput
at 64 blocking threads (and the naive batcher's beside it, for their ratio),
at 1024 asyncio tasks, a simulated model (500 us + 5 us per item of
busy CPU, GIL released) at 64 asyncio tasks, and a lone asyncio caller's
round trip p50 (``max_delay=0``).

With ``--callgrind`` (valgrind installed), also the instructions a lone
blocking call costs, counted by ``valgrind --tool=callgrind`` over the whole
process (caller and worker threads): the count of 9,000 calls less that of
3,000, divided by 6,000, so start-up and import cost cancel out.  Unlike the
wall-clock rows it hardly moves between runs on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One measurement, run as `python -c` in a fresh process: prints one JSON line.
PROBE = r"""
import asyncio, json, sys, time
sys.path.insert(0, {here!r})
from loadgen import run_tasks, run_threads, percentile
from naive import NaiveBatcher
import batched_fn
kind = {kind!r}
noop = lambda batch: batch
if kind == "threads64":
    f = batched_fn.batched_fn(noop, max_batch_size=32, max_delay=0.0)
    run_threads(f, 64, 0.2)
    r = run_threads(f, 64, 1.0)
    f.close()
    nb = NaiveBatcher(noop, 32, 0.0)
    run_threads(nb, 64, 0.2)
    n = run_threads(nb, 64, 1.0)
    nb.close()
    out = {{"rps": r["rps"], "naive_rps": n["rps"], "ratio_vs_naive": r["rps"] / n["rps"]}}
elif kind == "sim_tasks64":
    from scenarios import load_spin, sim_handler
    f = batched_fn.batched_fn(sim_handler(load_spin()), max_batch_size=32, max_delay=0.0)
    async def go():
        await run_tasks(f.acall, 64, 0.2)
        return await run_tasks(f.acall, 64, 1.0)
    r = asyncio.run(go())
    f.close()
    out = {{"rps": r["rps"]}}
elif kind == "tasks1024":
    f = batched_fn.batched_fn(noop, max_batch_size=32, max_delay=0.0)
    async def go():
        await run_tasks(f.acall, 1024, 0.2)
        return await run_tasks(f.acall, 1024, 1.0)
    r = asyncio.run(go())
    f.close()
    out = {{"rps": r["rps"]}}
else:  # lone asyncio caller
    f = batched_fn.batched_fn(noop, max_batch_size=32, max_delay=0.0)
    async def go():
        rtts = []
        for i in range(3000):
            t0 = time.perf_counter()
            await f.acall(i)
            rtts.append(time.perf_counter() - t0)
        return sorted(rtts[500:])
    rtts = asyncio.run(go())
    f.close()
    out = {{"rtt_p50_us": percentile(rtts, 0.5) * 1e6, "rtt_p99_us": percentile(rtts, 0.99) * 1e6}}
print(json.dumps(out))
"""

KINDS = ["threads64", "tasks1024", "sim_tasks64", "lone_async"]

# A lone blocking caller, n calls, for callgrind: the process's instruction count is read
# from callgrind's summary.
CALLS = r"""
import sys
import batched_fn
f = batched_fn.batched_fn(lambda batch: batch, max_batch_size=32, max_delay=0.0)
for i in range(int(sys.argv[1])):
    f(i)
f.close()
"""
CALLGRIND_CALLS = (3000, 9000)


def instructions(build: str, calls: int) -> int:
    """Instructions (callgrind's "Collected") of a process making `calls` lone blocking calls."""
    env_path = str(Path(build).resolve())
    res = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r})\n" + CALLS,
                          str(calls)], capture_output=True, text=True, timeout=900)
    found = re.search(r"Collected\s*:\s*(\d+)", res.stderr)
    if res.returncode or not found:
        raise SystemExit(f"callgrind on {build} failed:\n{res.stderr[-2000:]}")
    return int(found.group(1))


def instructions_per_call(build: str) -> float:
    few, many = CALLGRIND_CALLS
    return (instructions(build, many) - instructions(build, few)) / (many - few)


def probe(build: str, kind: str) -> dict:
    code = PROBE.format(here=str(HERE), kind=kind)
    env_path = str(Path(build).resolve())
    res = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r})\n" + code],
                         capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise SystemExit(f"probe {kind} on {build} failed:\n{res.stderr}")
    out = res.stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_a")
    ap.add_argument("build_b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--callgrind", action="store_true",
                    help="also count a lone blocking call's instructions under valgrind (one run per build)")
    args = ap.parse_args(argv)
    raw: dict[str, dict[str, list[dict]]] = {b: {k: [] for k in KINDS} for b in ("A", "B")}
    for r in range(args.rounds):
        for kind in KINDS:
            for label, build in (("A", args.build_a), ("B", args.build_b)):
                raw[label][kind].append(probe(build, kind))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"| measurement | A: {args.build_a} | B: {args.build_b} | B/A |")
    print("|---|---|---|---|")
    for kind in KINDS:
        for key in raw["A"][kind][0]:
            a = statistics.median(x[key] for x in raw["A"][kind])
            b = statistics.median(x[key] for x in raw["B"][kind])
            print(f"| {kind} {key} | {a:,.2f} | {b:,.2f} | {b / a:.2f} |")
    if args.callgrind:
        a, b = instructions_per_call(args.build_a), instructions_per_call(args.build_b)
        print(f"| lone blocking call, instructions (callgrind) | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
