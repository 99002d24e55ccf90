"""batched_model on CUDA: pinned non-blocking copies, worker streams, several GPUs.

Each test here skips without CUDA (``make gpu-check`` runs them on a GPU
machine); the same code paths (collate -> to_device -> forward -> split ->
make_ready, with the stream steps no-ops) are covered on CPU in
test_torch_model.py and test_torch_safety.py.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from batched_fn._torch.collate import collate  # noqa: E402
from batched_fn._torch.spec import TensorSpec  # noqa: E402
from batched_fn.torch import batched_model  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def mlp() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


def test_collate_writes_into_pinned_memory():
    batch = collate([torch.randn(64) for _ in range(4)], TensorSpec((64,), torch.float32), pin=True)
    assert batch.is_pinned()


@pytest.mark.parametrize("pipeline", [False, True])
def test_results_match_the_cpu_model(pipeline):
    model = mlp()
    seen = []

    def call(m, x):
        seen.append((x.device.type, torch.is_inference_mode_enabled()))
        return m(x)

    xs = [torch.randn(64) for _ in range(200)]
    with batched_model(model, device="cuda", pipeline=pipeline, call=call, max_batch_size=16,
                       max_delay=0.001) as predict:
        ys = [f.result(30) for f in [predict.submit(x) for x in xs]]
        assert predict.config.num_workers == (2 if pipeline else 1)
    ref = mlp()
    with torch.no_grad():
        want = ref(torch.stack(xs))
    torch.testing.assert_close(torch.stack(ys), want, rtol=1e-4, atol=1e-4)
    assert all(dev == "cuda" and inference for dev, inference in seen)
    assert all(y.device.type == "cpu" for y in ys)


def test_output_device_none_leaves_outputs_on_the_gpu():
    with batched_model(mlp(), device="cuda", output_device=None, max_delay=0) as predict:
        y = predict(torch.randn(64))
    assert y.device.type == "cuda"
    assert torch.isfinite(y * 2).all()


def test_autocast_fp16():
    with batched_model(mlp(), device="cuda", autocast="fp16", max_delay=0) as predict:
        assert predict(torch.randn(64)).dtype == torch.float16


def test_padded_sequences_on_cuda():
    emb = torch.nn.Embedding(50, 8)

    def call(m, batch):
        e = m(batch.values) * batch.attention_mask.unsqueeze(-1)
        return e.sum(1) / batch.attention_mask.sum(1, keepdim=True)

    seqs = [torch.randint(0, 50, (n,)) for n in (1, 9, 4)]
    with batched_model(emb, device="cuda", pad=True, call=call, max_batch_size=3,
                       max_delay=0.05) as predict:
        ys = [f.result(30) for f in [predict.submit(s) for s in seqs]]
    with torch.no_grad():
        for s, y in zip(seqs, ys):
            torch.testing.assert_close(y, emb(s).mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_one_replica_each():
    devices_seen = set()

    def call(m, x):
        devices_seen.add(x.device)
        return m(x)

    with batched_model(mlp, devices=["cuda:0", "cuda:1"], call=call, max_batch_size=4,
                       max_delay=0.001) as predict:
        futs = [predict.submit(torch.randn(64)) for _ in range(400)]
        assert all(f.result(30).shape == (8,) for f in futs)
    assert devices_seen == {torch.device("cuda:0"), torch.device("cuda:1")}


# ---------------------------------------------------------------- GPU-only checks
# What a CPU cannot show: streams, pinned copies, real out-of-memory, a broken context.

def slow_double(m, x):
    """x * 2, queued behind ~50 ms of GPU sleep on the current (worker) stream."""
    torch.cuda._sleep(50_000_000)
    return x * 2


@pytest.mark.parametrize("output_device", ["cpu", "cuda", None])
def test_outputs_are_complete_when_read_on_another_stream_at_once(output_device):
    # rows used to reach callers while their copy was still queued
    other = torch.cuda.Stream()
    with batched_model(mlp(), device="cuda", output_device=output_device, call=slow_double,
                       max_batch_size=4, max_delay=0.002) as predict:
        for round_ in range(6):
            xs = [torch.full((64,), float(round_ * 4 + i)) for i in range(4)]
            ys = [f.result(30) for f in [predict.submit(x) for x in xs]]
            with torch.cuda.stream(other):
                got = [(y + 0).cpu() if y.is_cuda else y.clone() for y in ys]
            other.synchronize()
            for x, y, g in zip(xs, ys, got):
                if output_device == "cpu":
                    assert y.device.type == "cpu" and y.is_pinned()
                torch.testing.assert_close(g, x * 2)


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("allowed", [None, (1, 2, 4, 8, 16, 32)])
@pytest.mark.parametrize("output_device", ["cpu", None])
def test_4000_distinct_inputs_reach_their_own_callers(pipeline, allowed, output_device):
    xs = [torch.full((64,), float(i)) for i in range(4000)]
    with batched_model(lambda: (lambda x: x * 2 + 1), device="cuda", pipeline=pipeline,
                       allowed_batch_sizes=allowed, output_device=output_device,
                       max_batch_size=32, max_delay=0.001) as predict:
        futs = [predict.submit(x) for x in xs]
        ys = [f.result(60) for f in futs]
    for i, y in enumerate(ys):
        assert float(y[0]) == 2 * i + 1 and float(y[-1]) == 2 * i + 1


def test_out_of_memory_frees_the_batch_memory_before_the_caller_sees_it():
    # the traceback's frames kept the activations alive
    def model(x):
        activation = torch.empty(256 * 2**20, device=x.device)   # 1 GiB
        huge = torch.empty(2**50, device=x.device)                # far beyond any GPU: OOM
        return activation[: len(x)] + huge[: len(x)]

    dev = torch.device("cuda", torch.cuda.current_device())
    with batched_model(lambda: model, device=dev, max_delay=0) as predict:
        predict.start()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        with pytest.raises(torch.OutOfMemoryError) as info:
            predict(torch.ones(4))
        assert info.value is not None   # held by this frame while memory is measured
        assert torch.cuda.memory_allocated(dev) - base < 64 * 2**20
        assert predict.healthy


STICKY_SCRIPT = r"""
import torch
from batched_fn import BatchedFnError
from batched_fn.torch import batched_model

emb = torch.nn.Embedding(10, 4)
with batched_model(emb, device="cuda", max_delay=0) as predict:
    assert predict(torch.tensor([1, 2])).shape == (2, 4)
    try:
        predict(torch.tensor([1, 99]))    # out of range: a device-side assert
    except RuntimeError as exc:
        assert "device-side assert" in str(exc), exc
    else:
        raise AssertionError("no error from an out-of-range index")
    assert not predict.healthy
    try:
        predict(torch.tensor([1, 2]))
    except BatchedFnError as exc:
        assert "restart the process" in str(exc), exc
    else:
        raise AssertionError("a broken context served another batch")
print("sticky-ok")
"""


def test_a_device_side_assert_makes_the_function_unhealthy():
    # in a child process: the assert breaks the CUDA context for good
    import os
    import subprocess
    import sys
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="0")
    out = subprocess.run([sys.executable, "-c", STICKY_SCRIPT], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0 and "sticky-ok" in out.stdout, out.stderr[-3000:]


def test_a_cpu_module_is_copied_to_each_gpu_and_the_factory_runs_on_its_device():
    # copies come from the CPU template; the factory sees its device as current
    current = []

    def load(device):
        current.append((str(device), torch.cuda.current_device()))
        return mlp().to(device)

    n = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(n)]
    with batched_model(load, devices=devices, max_delay=0) as predict:
        predict.start()
    assert sorted(current) == [(d, i) for i, d in enumerate(devices)]
    template = mlp()
    with batched_model(template, devices=devices * 2 if n == 1 else devices, max_delay=0) as predict:
        assert predict(torch.randn(64)).shape == (8,)
    assert all(p.device.type == "cpu" for p in template.parameters())


def test_close_gives_the_gpu_memory_back():
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    predict = batched_model(lambda: torch.nn.Linear(4096, 4096), device=dev, max_delay=0)
    assert predict(torch.randn(4096)).shape == (4096,)
    assert torch.cuda.memory_allocated(dev) - base >= 4096 * 4096 * 4
    predict.close()
    import gc
    gc.collect()
    assert torch.cuda.memory_allocated(dev) - base < 2**20
