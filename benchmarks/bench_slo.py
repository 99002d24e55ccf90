"""Goodput under overload: calls answered within their SLO per second, from 0.5x to 3x capacity.

    python benchmarks/bench_slo.py [--seconds 2] [--rounds 1] [--quick]

Handler: 2 ms + 50 us per input (time.sleep, the GIL released), max_batch_size 32.
The capacity is measured first (closed loop, 64 callers, full batches).  Then
open-loop Poisson arrivals (a schedule drawn first, sent by several threads) at 0.5x, 0.9x, 1.2x, 1.5x and 3x
that capacity, every call ``submit(x, timeout=SLO, priority=p)`` with an SLO
of 50 ms, and a two-class mix: a fifth of the calls at priority 1, the rest
at 0 (the low class floods as the load grows).  Goodput and latency count
from each call's send (what the batcher answers for); the honest columns
count from its scheduled time, so the generator's own lag shows, and the
calls it sent late are counted apart.

Three batchers side by side, each cell in turn (a rotating order per load):

- ``classic``: the behaviour before deadlines and priorities (arrival order,
  timeout= bounds only the wait for a batch, no shedding), max_delay 5 ms;
- ``fixed``: timeout= bounds the whole call, priorities, shedding by prediction, max_delay 5 ms;
- ``auto``: the same with max_delay="auto".

Goodput counts calls whose output came within the SLO.  Targets (for
``fixed`` and ``auto``): goodput >= 0.9x capacity at 1.5x load and >= 0.8x
at 3x; the high class >= 99 % within the SLO up to 1.2x; p99 of answered
calls <= the SLO; nothing lost (every call gets an output or an exception).
Writes a markdown table (``--out``) and a plot of goodput and p99 against
offered load (``--plot``, if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import batched_fn._api as api
from batched_fn import Full, batched_fn

HERE = Path(__file__).resolve().parent
MAX_BATCH = 32
FIXED_S = 0.002
PER_ITEM_S = 50e-6
SLO_S = 0.050
HIGH_SHARE = 0.2
LOADS = (0.5, 0.9, 1.2, 1.5, 3.0)
VARIANTS = ("classic", "fixed", "auto")
#: bounds of the whole run, whatever the arguments: no cell sends more than this many calls
MAX_CALLS_PER_CELL = 400_000


def handler(xs: list[int]) -> list[int]:
    """The model: 2 ms a batch plus 50 us an input, the GIL released."""
    time.sleep(FIXED_S + PER_ITEM_S * len(xs))
    return xs


def make(variant: str) -> Any:
    """A batcher of the variant (see the module docstring)."""
    api._CLASSIC = variant == "classic"
    try:
        return batched_fn(handler, max_batch_size=MAX_BATCH, max_delay="auto" if variant == "auto" else 0.005)
    finally:
        api._CLASSIC = False


def measure_capacity(seconds: float, callers: int = 64) -> float:
    """Closed loop: callers threads calling back to back; inputs/s."""
    f = batched_fn(handler, max_batch_size=MAX_BATCH, max_delay=0.0)
    done = [0] * callers
    t_end = time.perf_counter() + seconds + 0.3
    t_measure = t_end - seconds

    def run(k: int) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            f(k)
            if t0 >= t_measure:
                done[k] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    return sum(done) / seconds


@dataclass
class Cell:
    """One variant at one load."""

    variant: str
    load: float                       # share of capacity asked for
    offered: float = 0.0              # calls/s actually sent in the measured window
    goodput: float = 0.0              # answered within the SLO of their send, per second
    goodput_sched: float = 0.0        # answered within the SLO of their scheduled time (late sends count)
    p99_ms: float = 0.0               # p99 latency of answered calls
    p50_ms: float = 0.0
    in_slo: dict[int, float] = field(default_factory=dict)   # priority -> share answered within the SLO
    in_slo_sched: dict[int, float] = field(default_factory=dict)  # the same, counted from the scheduled time
    outcomes: dict[str, int] = field(default_factory=dict)   # ok / over_slo / timeout / shed / other
    sent_late: int = 0                # calls the generator sent more than LATE_SEND_S after their time
    lag_p99_ms: float = 0.0           # p99 of the generator's send lag
    counters: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # stats().by_priority
    lost: int = 0                     # calls with no outcome at the end (must be 0)
    mean_batch: float = 0.0
    handler_p99_ms: float = 0.0       # p99 of the handler's time per batch (a 3.6 ms sleep at most: more is the OS)


#: sender threads of the load generator: a call due while one is inside submit() goes out from another
SENDERS = 4
#: a call sent more than this after its scheduled time counts as sent late (the generator's fault, not the batcher's)
LATE_SEND_S = 0.005


def schedule(rate: float, t_total: float, seed: int) -> tuple[list[float], list[int]]:
    """Open-loop Poisson arrivals: offsets from the start (s) and priorities, drawn before the cell runs."""
    rng = random.Random(seed)
    times: list[float] = []
    priorities: list[int] = []
    t = rng.expovariate(rate)
    while t < t_total and len(times) < MAX_CALLS_PER_CELL:
        times.append(t)
        priorities.append(1 if rng.random() < HIGH_SHARE else 0)
        t += rng.expovariate(rate)
    return times, priorities


def run_cell(variant: str, load: float, capacity: float, seconds: float, warmup: float, seed: int) -> Cell:
    """Open-loop Poisson arrivals at load x capacity for warmup + seconds; classify every call.

    The schedule is drawn first; SENDERS threads share it (thread k sends
    calls k, k + SENDERS, ...), so one sender stuck behind the worker for
    the GIL does not hold back the others.  Each call is sent with the
    whole SLO as its timeout and records when it was sent and when its
    outcome came: the batcher is judged from the send, the honest columns
    from the scheduled time.
    """
    f = make(variant)
    f.start()
    # What GUIDE §11 asks of a server: the heap built so far (earlier cells
    # included) leaves the collector's passes, so none pauses this cell.
    gc.collect()
    gc.freeze()
    times, priorities = schedule(load * capacity, warmup + seconds, seed)
    n = len(times)
    sent_at = [0.0] * n
    done_at = [0.0] * n
    outcome_of: list[Any] = [None] * n       # a Future, or "shed"
    t_start = time.perf_counter() + 0.01
    due = [t_start + t for t in times]

    def sender(k: int) -> None:
        submit = f.submit
        perf = time.perf_counter
        for i in range(k, n, SENDERS):
            wait = due[i] - perf()
            if wait > 0.0002:
                time.sleep(wait - 0.0001)
            now = perf()
            sent_at[i] = now
            try:
                fut = submit(i, timeout=SLO_S, priority=priorities[i])
            except Full:
                done_at[i] = perf()
                outcome_of[i] = "shed"
            else:
                outcome_of[i] = fut
                fut.add_done_callback(lambda _, i=i: done_at.__setitem__(i, perf()))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lost = 0
    for o in outcome_of:
        if o is None or o == "shed":
            continue
        try:
            o.result(timeout=30)
        except TimeoutError:
            if not o.done():
                lost += 1
        except Exception:
            pass
    stats = f.stats()
    f.close()
    cell = Cell(variant, load, lost=lost, mean_batch=stats.mean_batch_size, handler_p99_ms=stats.handler_p99 * 1e3)
    cell.counters = {p: (c.answered, c.late, c.shed, c.expired) for p, c in stats.by_priority.items()}
    got = []      # (priority, outcome, latency from send, latency from schedule, send lag)
    for i in range(n):
        if times[i] < warmup:
            continue
        o = outcome_of[i]
        lag = sent_at[i] - due[i]
        if isinstance(o, str):
            outcome = "shed"
        else:
            exc = o.exception()
            if exc is None:
                outcome = "ok" if done_at[i] - sent_at[i] <= SLO_S else "over_slo"
            elif isinstance(exc, TimeoutError):
                outcome = "timeout"
            elif isinstance(exc, Full):
                outcome = "shed"
            else:
                outcome = "other"
        got.append((priorities[i], outcome, done_at[i] - sent_at[i], done_at[i] - due[i], lag))
    cell.offered = len(got) / seconds
    lags = sorted(g[4] for g in got)
    if lags:
        cell.lag_p99_ms = lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1e3
    cell.sent_late = sum(1 for g in got if g[4] > LATE_SEND_S)
    answered = sorted(g[2] for g in got if g[1] in ("ok", "over_slo"))
    cell.goodput = sum(1 for g in got if g[1] == "ok") / seconds
    # honest: within the SLO counted from the scheduled time (a late send eats into it)
    cell.goodput_sched = sum(1 for g in got if g[1] == "ok" and g[3] <= SLO_S) / seconds
    if answered:
        cell.p50_ms = answered[len(answered) // 2] * 1e3
        cell.p99_ms = answered[min(len(answered) - 1, int(0.99 * len(answered)))] * 1e3
    for p in (0, 1):
        mine = [g for g in got if g[0] == p]
        cell.in_slo[p] = sum(1 for g in mine if g[1] == "ok") / len(mine) if mine else float("nan")
        cell.in_slo_sched[p] = (sum(1 for g in mine if g[1] == "ok" and g[3] <= SLO_S) / len(mine)
                                if mine else float("nan"))
    for g in got:
        cell.outcomes[g[1]] = cell.outcomes.get(g[1], 0) + 1
    return cell


def median_cell(cells: list[Cell]) -> Cell:
    """The cell of median goodput among rounds (its other numbers come with it)."""
    return sorted(cells, key=lambda c: c.goodput)[len(cells) // 2]


def verdicts(cells: list[Cell], capacity: float) -> list[tuple[str, bool]]:
    """The targets, for the fixed and auto variants."""
    out = []
    for c in cells:
        if c.variant == "classic":
            continue
        if c.load == 1.5:
            out.append((f"{c.variant}: goodput at 1.5x >= 0.9x capacity", c.goodput >= 0.9 * capacity))
        if c.load == 3.0:
            out.append((f"{c.variant}: goodput at 3x >= 0.8x capacity", c.goodput >= 0.8 * capacity))
        if c.load <= 1.2:
            out.append((f"{c.variant}: high class within SLO >= 99 % at {c.load}x", c.in_slo[1] >= 0.99))
        out.append((f"{c.variant}: p99 of answered <= SLO at {c.load}x", c.p99_ms <= SLO_S * 1e3))
    out.append(("nothing lost", all(c.lost == 0 for c in cells)))
    return out


def table(cells: list[Cell], capacity: float, command: str, machine: str, load_avg: str = "") -> str:
    lines = [
        f"Command: `{command}` ({datetime.date.today().isoformat()}; {machine}, {os.cpu_count()} CPUs; "
        f"load average {load_avg}; a machine shared with other work, so figures are noisy: compare the "
        "columns of one run).",
        "",
        f"Capacity (closed loop, 64 callers, full batches): **{capacity:.0f} calls/s**. "
        f"SLO {SLO_S * 1e3:.0f} ms per call; a fifth of the calls at priority 1. GIL switch interval "
        f"{sys.getswitchinterval() * 1e3:g} ms.",
        "",
        "| load | batcher | offered/s | goodput/s | goodput / capacity | high in SLO | low in SLO | "
        "p50 ms | p99 ms (answered) | answered after SLO | TimeoutError | shed (Full) | lost | mean batch "
        "| handler p99 ms | sent late | send lag p99 ms | goodput / capacity from schedule "
        "| high in SLO from schedule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        o = c.outcomes
        lines.append(
            f"| {c.load}x | {c.variant} | {c.offered:.0f} | {c.goodput:.0f} | {c.goodput / capacity:.2f} | "
            f"{c.in_slo[1] * 100:.1f} % | {c.in_slo[0] * 100:.1f} % | {c.p50_ms:.1f} | {c.p99_ms:.1f} | "
            f"{o.get('over_slo', 0)} | {o.get('timeout', 0)} | {o.get('shed', 0)} | "
            f"{c.lost} | {c.mean_batch:.1f} | {c.handler_p99_ms:.1f} | {c.sent_late} | {c.lag_p99_ms:.1f} | "
            f"{c.goodput_sched / capacity:.2f} | {c.in_slo_sched[1] * 100:.1f} % |")
    lines += ["", "Counts are calls in the measured window.  Each call is sent with the whole SLO as its "
              "timeout; *goodput*, *in SLO* and the latencies count from when it was sent.  The load generator "
              f"is {SENDERS} threads sharing one Poisson schedule drawn beforehand (they share the interpreter "
              "with the worker); *sent late*: calls sent more than "
              f"{LATE_SEND_S * 1e3:.0f} ms after their scheduled time, *send lag p99*: how far behind it ran.  The "
              "last two columns are the honest view, counting from the scheduled time (a late send eats into "
              "the SLO).  *handler p99*: the handler sleeps at most 3.6 ms, so anything longer is the OS not "
              "running the worker.", "",
              "Per priority, from `stats().by_priority` (answered / late / shed / expired), whole cell including "
              "warm-up:", ""]
    for c in cells:
        if c.variant == "classic":
            continue
        parts = ", ".join(f"p{p}: {'/'.join(str(x) for x in v)}" for p, v in sorted(c.counters.items()))
        lines.append(f"- {c.load}x {c.variant}: {parts}")
    lines += ["", "Targets (fixed and auto):", ""]
    for name, ok in verdicts(cells, capacity):
        lines.append(f"- {'met' if ok else 'MISSED'}: {name}")
    return "\n".join(lines) + "\n"


def plot(cells: list[Cell], capacity: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANTS:
        mine = sorted((c for c in cells if c.variant == variant), key=lambda c: c.load)
        ax1.plot([c.load for c in mine], [c.goodput / capacity for c in mine], marker="o", label=variant)
        ax2.plot([c.load for c in mine], [c.p99_ms for c in mine], marker="o", label=variant)
    ax1.set_xlabel("offered load / capacity")
    ax1.set_ylabel("goodput / capacity (answered within 50 ms)")
    ax1.axhline(1.0, color="grey", linewidth=0.5)
    ax2.set_xlabel("offered load / capacity")
    ax2.set_ylabel("p99 of answered calls, ms")
    ax2.set_yscale("log")
    ax2.axhline(SLO_S * 1e3, color="grey", linewidth=0.5, linestyle="--")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every cell; the table shows medians")
    parser.add_argument("--quick", action="store_true", help="short cells (0.6 s), one round, loads 0.9x, 1.5x, 3x")
    parser.add_argument("--out", default=str(HERE / "results_slo.md"))
    parser.add_argument("--plot", default=str(HERE / "slo.png"))
    parser.add_argument("--switch-interval", type=float, default=0.0005,
                        help="sys.setswitchinterval for the run: the senders share the GIL with the worker, "
                             "which Python's 5 ms would hold up (the README's advice for such a process)")
    args = parser.parse_args(argv)
    sys.setswitchinterval(args.switch_interval)
    loads = LOADS
    if args.quick:
        args.seconds, args.warmup, args.rounds, loads = 0.6, 0.2, 1, (0.9, 1.5, 3.0)
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    capacity = measure_capacity(max(1.0, args.seconds))
    print(f"capacity: {capacity:.0f} calls/s (nominal {MAX_BATCH / (FIXED_S + PER_ITEM_S * MAX_BATCH):.0f}/s)",
          flush=True)
    runs: dict[tuple[float, str], list[Cell]] = {}
    for r in range(args.rounds):
        for j, load in enumerate(loads):
            k = (j + r) % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:    # a rotating order: drift hits every variant
                cell = run_cell(variant, load, capacity, args.seconds, args.warmup, 100 * r + j)
                runs.setdefault((load, variant), []).append(cell)
                print(f"round {r + 1} {load:>4}x {variant:>7}: offered {cell.offered:6.0f}/s goodput "
                      f"{cell.goodput:6.0f}/s ({cell.goodput / capacity:.2f}; "
                      f"{cell.goodput_sched / capacity:.2f} from schedule) "
                      f"high {cell.in_slo[1] * 100:5.1f} % p99 {cell.p99_ms:6.1f} ms {cell.outcomes} "
                      f"sent late {cell.sent_late} lag p99 {cell.lag_p99_ms:.1f} ms lost {cell.lost} "
                      f"by priority {cell.counters}", flush=True)
    cells = [median_cell(runs[(load, v)]) for load in loads for v in VARIANTS]
    command = "python benchmarks/bench_slo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        sys.path.insert(0, str(HERE))
        from machine import cpu_model
        machine = cpu_model()
    except Exception:
        machine = "unknown CPU"
    text = table(cells, capacity, command.strip(), machine,
                 f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(text)
    if args.quick:
        return 0 if all(c.lost == 0 for c in cells) else 1
    Path(args.out).write_text("# Goodput under overload: deadlines, priorities, shedding\n\n" + text)
    wrote = plot(cells, capacity, Path(args.plot))
    print(f"written {args.out}" + (f" and {args.plot}" if wrote else "") +
          f" ({time.monotonic() - started:.0f}s)")
    return 0 if all(ok for _, ok in verdicts(cells, capacity)) else 1


if __name__ == "__main__":
    sys.exit(main())
