"""batched_model on CUDA: pinned non-blocking copies, side streams, several GPUs.

Each test here skips without CUDA; the same code paths (collate -> prepare ->
run -> split, with the stream steps no-ops) are covered on CPU in
test_torch_model.py.
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
