"""``make gpu-check``: the CUDA tests, the GPU-only checks and a short GPU benchmark, in one command.

On a machine with CUDA:

1. ``tests/torch_layer/test_torch_cuda.py`` (pytest): pinned copies, fp16, padding, several
   GPUs, and what a CPU cannot show: outputs read on another stream right
   after the call returns (every ``output_device``), 4,000 distinct inputs
   with pipelining and allowed batch sizes on and off, out-of-memory memory
   release, a device-side assert making ``healthy`` False, ``close()``
   giving the GPU memory back;
2. peak GPU memory of a transformer encoder served with pipelining off and on;
3. items/s and p50 latency: a per-request loop (one caller, batch of 1)
   vs ``batched_model`` (64 callers) vs the same pipelined, for two models.

It prints one table and writes ``benchmarks/out/gpu_check.{md,json}``.  About
two to four minutes with set-up done.  Without torch or without a CUDA device
it says why and exits 0; it exits 1 if a test failed.  Run it with the
package importable (installed, or built in place and ``PYTHONPATH=python``,
which is what ``make gpu-check`` does):

    python benchmarks/gpu_check.py [--seconds 4] [--skip-tests]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parent
OUT = ROOT / "out"
CALLERS = 64


def skip(why: str) -> None:
    print(f"gpu-check: SKIPPED: {why}. Nothing was checked; run `make gpu-check` on a machine with "
          f"a CUDA GPU and a CUDA build of torch.")
    sys.exit(0)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_tests() -> int:
    """The CUDA tests, in a child pytest; returns its exit status."""
    print("gpu-check: running tests/torch_layer/test_torch_cuda.py ...", flush=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "torch_layer/test_torch_cuda.py"]
    env = dict(os.environ)
    if env.get("PYTHONPATH"):   # the tests run from tests/: make relative entries absolute
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep))
    return subprocess.run(cmd, cwd=ROOT.parent / "tests", env=env, timeout=420).returncode


def models(torch: Any, small: bool) -> dict[str, tuple[Callable[[], Any], Callable[[int], Any], dict[str, Any]]]:
    """name -> (factory, example maker, batched_model knobs); small: tiny sizes for a CPU dry run."""
    width, d_model, tokens = (64, 32, 8) if small else (2048, 512, 128)
    autocast = "bf16" if small else "fp16"

    def mlp() -> Any:
        torch.manual_seed(0)
        layers: list[Any] = []
        for _ in range(4):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        return torch.nn.Sequential(*layers)

    def encoder() -> Any:
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(d_model, 8, 4 * d_model, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)

    def mlp_x(i: int) -> Any:
        return torch.randn(width, generator=torch.Generator().manual_seed(i))

    def enc_x(i: int) -> Any:
        return torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(i))

    return {
        f"MLP 4x{width}": (mlp, mlp_x, {"max_batch_size": 64}),
        f"encoder 6x{d_model}, {tokens} tokens, {autocast}": (
            encoder, enc_x, {"max_batch_size": 64, "autocast": autocast}),
    }


def loop_rate(torch: Any, dev: Any, model: Any, examples: list[Any], seconds: float,
              autocast: Any) -> dict[str, float]:
    """One caller, one example at a time, straight through the model (no batched_fn)."""
    dtype = torch.float16 if autocast == "fp16" else torch.bfloat16
    ctx = (lambda: torch.autocast(dev.type, dtype=dtype)) if autocast else contextlib.nullcontext
    lat: list[float] = []
    start = time.perf_counter()
    i = 0
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            with ctx():
                model(examples[i % len(examples)][None].to(dev, non_blocking=True))[0].cpu()
            lat.append(time.perf_counter() - t0)
            i += 1
    return {"items_per_s": i / (time.perf_counter() - start), "p50_ms": percentile(lat, 0.5) * 1e3}


def batched_rate(predict: Any, examples: list[Any], seconds: float) -> dict[str, float]:
    """CALLERS asyncio callers, each awaiting predict.acall in a closed loop."""
    lat: list[float] = []

    async def caller(k: int, stop: float) -> int:
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await predict.acall(examples[(k * 7919 + n) % len(examples)])
            lat.append(time.perf_counter() - t0)
            n += 1
        return n

    async def main() -> tuple[int, float]:
        start = time.perf_counter()
        counts = await asyncio.gather(*(caller(k, start + seconds) for k in range(CALLERS)))
        return sum(counts), time.perf_counter() - start

    n, elapsed = asyncio.run(main())
    return {"items_per_s": n / elapsed, "p50_ms": percentile(lat, 0.5) * 1e3}


def measure(torch: Any, device: str, seconds: float) -> list[dict[str, Any]]:
    """Per model: loop, batched, batched + pipelined (items/s, p50, peak GPU memory)."""
    from batched_fn.torch import batched_model
    cuda = device == "cuda"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(device)
    nan = float("nan")
    rows = []
    for name, (factory, make_x, knobs) in models(torch, small=not cuda).items():
        examples = [make_x(i) for i in range(256)]
        model = factory().to(dev).eval()
        loop_rate(torch, dev, model, examples[:8], min(seconds, 0.5), knobs.get("autocast"))   # warm-up
        res = loop_rate(torch, dev, model, examples, seconds, knobs.get("autocast"))
        rows.append({"model": name, "mode": "per-request loop, 1 caller", **res, "peak_mib": nan})
        del model
        if cuda:
            torch.cuda.empty_cache()
        for pipeline in (False, True):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            with batched_model(factory, device=dev, pipeline=pipeline, max_delay=0.002, **knobs) as predict:
                batched_rate(predict, examples, min(seconds, 0.5))   # warm-up
                res = batched_rate(predict, examples, seconds)
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if cuda else nan
            mode = f"batched{', pipelined' if pipeline else ''}, {CALLERS} callers"
            rows.append({"model": name, "mode": mode, **res, "peak_mib": peak})
            if cuda:
                torch.cuda.empty_cache()
        print(f"gpu-check: measured {name}", flush=True)
    return rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| model | mode | items/s | p50 ms | peak GPU MiB (model + batches) |",
             "|---|---|---|---|---|"]
    for r in rows:
        peak = "" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['mode']} | {r['items_per_s']:.0f} | {r['p50_ms']:.2f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per benchmark row")
    ap.add_argument("--skip-tests", action="store_true", help="only the measurements")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the measurements with tiny models (tests this script)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help="folder for gpu_check.{md,json}")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        skip("torch is not installed in this Python")
    if args.device == "cuda" and not torch.cuda.is_available():
        skip(f"no CUDA device visible (torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    started = time.perf_counter()
    status = 0 if args.skip_tests or args.device != "cuda" else run_tests()
    rows = measure(torch, args.device, args.seconds)
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        where = "cpu (dry run, tiny models)"
    header = (f"gpu-check on {where}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}; {args.seconds:g} s per row; "
              "tests: " + ("skipped" if args.skip_tests or args.device != "cuda"
                           else "passed" if status == 0 else "FAILED"))
    text = table(rows, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(f"gpu-check: done in {time.perf_counter() - started:.0f} s; written to {args.out / 'gpu_check.md'}")
    sys.exit(1 if status else 0)


if __name__ == "__main__":
    main()
