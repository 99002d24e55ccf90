"""batched_model on CPU: collation, outputs, devices, pipelining, allowed sizes, bad input."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from batched_fn import BatchedFnError, Closed  # noqa: E402
from batched_fn.torch import Padded, TensorSpec, batched_model  # noqa: E402
from torch_models import MaskedMean  # noqa: E402


def mlp(width: int = 16) -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


class Recorder(torch.nn.Module):
    """Wraps a model; records what each call saw; can hold a batch at a gate."""

    def __init__(self, inner: "torch.nn.Module") -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def forward(self, x):
        self.seen.append((tuple(x.shape), torch.is_inference_mode_enabled(), threading.current_thread().name))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return self.inner(x)


def hold_first_batch(predict, rec: Recorder, x):
    """Run x alone and keep its batch in the model until the returned event is set."""
    rec.gate = threading.Event()
    first = predict.submit(x)
    assert rec.entered.wait(10)
    return first, rec.gate


def test_import_does_not_import_torch():
    code = ("import sys, batched_fn, batched_fn.torch; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_same_shape_inputs_are_stacked_and_outputs_split_per_caller():
    model = mlp()
    rec = Recorder(model)
    xs = [torch.randn(16) for _ in range(6)]
    with batched_model(rec, max_batch_size=8, max_delay=0.05) as predict:
        first, gate = hold_first_batch(predict, rec, xs[0])
        futs = [predict.submit(x) for x in xs[1:]]
        gate.set()
        ys = [first.result(10)] + [f.result(10) for f in futs]
    with torch.no_grad():
        want = [model(x[None])[0] for x in xs]
    for y, w in zip(ys, want):
        assert y.shape == (4,)
        torch.testing.assert_close(y, w)
    assert [s for s, _, _ in rec.seen] == [(1, 16), (5, 16)]
    assert all(inference for _, inference, _ in rec.seen)


def test_outputs_are_ordinary_cpu_tensors_by_default():
    rec = Recorder(lambda x: x * 1)
    xs = [torch.zeros(3), torch.ones(3), torch.full((3,), 2.0)]
    with batched_model(rec, max_batch_size=4, max_delay=0.05) as predict:
        first, gate = hold_first_batch(predict, rec, xs[0])
        a, b = predict.submit(xs[1]), predict.submit(xs[2])
        gate.set()
        first.result(10)
        ya, yb = a.result(10), b.result(10)
    assert rec.seen[1][0] == (2, 3)   # a and b shared a batch
    assert ya.device.type == "cpu" and not ya.is_inference()
    ya.add_(1)   # an inference tensor would refuse this outside inference_mode
    torch.testing.assert_close(ya, torch.full((3,), 2.0))
    torch.testing.assert_close(yb, torch.full((3,), 2.0))   # b's row is its own
    torch.testing.assert_close(xs[1], torch.ones(3))        # the input is untouched


def test_output_device_none_gives_each_caller_its_own_row_memory():
    # a row used to be a view keeping the whole batch output (and,
    # on a GPU, GPU memory) alive, and an inference tensor
    rec = Recorder(lambda x: {"emb": x * 2, "big": x.repeat(1, 100)})
    xs = [torch.full((3,), float(i)) for i in range(3)]
    with batched_model(rec, max_batch_size=4, max_delay=0.05, output_device=None) as predict:
        first, gate = hold_first_batch(predict, rec, xs[0])
        futs = [predict.submit(x) for x in xs[1:]]
        gate.set()
        ys = [first.result(10)] + [f.result(10) for f in futs]
    assert rec.seen[1][0] == (2, 3)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y["emb"], x * 2)
        assert not y["emb"].is_inference()
        assert y["emb"].untyped_storage().nbytes() == 3 * 4         # one row, not the batch
        assert y["big"].untyped_storage().nbytes() == 300 * 4


def test_numpy_inputs_are_collated():
    model = mlp()
    xs = [np.random.default_rng(i).standard_normal(16).astype(np.float32) for i in range(4)]
    xs[1].setflags(write=False)   # read-only arrays are copied, not rejected
    with batched_model(model, max_batch_size=4, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit(x) for x in xs]]
    with torch.no_grad():
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, model(torch.from_numpy(x.copy())[None])[0])


def test_variable_length_tensors_are_padded_with_a_mask():
    model = MaskedMean(seed=1)
    seqs = [torch.randint(1, 100, (n,)) for n in (3, 7, 1, 5)]
    with batched_model(model, pad=True, max_batch_size=4, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit(s) for s in seqs]]
    with torch.no_grad():
        for s, y in zip(seqs, ys):
            torch.testing.assert_close(y, model.one(s))
    lengths = sorted(int(m.sum()) for mask in model.masks for m in mask)
    assert lengths == [1, 3, 5, 7]


class TokenEmbed(torch.nn.Module):
    """Token-level output: one vector per position, padding included."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, 4)

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids) * attention_mask.unsqueeze(-1)


def test_trim_outputs_gives_each_caller_its_own_token_rows_only():
    model = TokenEmbed()
    seqs = [torch.randint(1, 100, (n,)) for n in (3, 7, 1, 5)]
    with batched_model(model, pad=True, trim_outputs=True, max_batch_size=4, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit(s) for s in seqs]]
    with torch.no_grad():
        for s, y in zip(seqs, ys):
            assert y.shape == (len(s), 4)
            torch.testing.assert_close(y, model.emb(s))
    with batched_model(model, pad=True, max_batch_size=4, max_delay=0.05) as untrimmed:
        rows = [f.result(10) for f in [untrimmed.submit(s) for s in seqs]]
    assert {r.shape[0] for r in rows} == {7}          # without it: the batch's padded length
    with pytest.raises(ValueError, match="trim_outputs value: it needs pad=True"):
        batched_model(model, trim_outputs=True)


def test_dict_inputs_collate_field_by_field_like_a_tokenizer_output():
    model = MaskedMean(seed=1)
    seqs = [torch.randint(1, 100, (n,)) for n in (2, 6, 4)]
    examples = [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in seqs]
    with batched_model(model, pad=True, max_batch_size=3, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit(e) for e in examples]]
    with torch.no_grad():
        for s, y in zip(seqs, ys):
            torch.testing.assert_close(y, model.one(s))


def test_a_dict_without_a_mask_gets_one_when_padded():
    model = MaskedMean(seed=1)
    seqs = [torch.randint(1, 100, (n,)) for n in (2, 5)]
    with batched_model(model, pad=True, max_batch_size=2, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit({"input_ids": s}) for s in seqs]]
    with torch.no_grad():
        for s, y in zip(seqs, ys):
            torch.testing.assert_close(y, model.one(s))


def test_tuple_inputs_and_dict_and_tuple_outputs_are_split():
    def both(a, b):
        return {"sum": a + b, "parts": (a, b * 2)}

    pairs = [(torch.full((3,), float(i)), torch.full((3,), 10.0 * i)) for i in range(5)]
    with batched_model(lambda: both, max_batch_size=5, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit(p) for p in pairs]]
    for (a, b), y in zip(pairs, ys):
        torch.testing.assert_close(y["sum"], a + b)
        assert isinstance(y["parts"], tuple)
        torch.testing.assert_close(y["parts"][1], b * 2)


def test_call_adapts_the_batch_to_the_model():
    model = MaskedMean(seed=1)
    seqs = [torch.randint(1, 100, (n,)) for n in (2, 5)]

    def call(m, batch: Padded):
        return {"emb": m(batch.values, batch.attention_mask), "n": batch.lengths}

    with batched_model(model, pad=True, call=call, max_batch_size=2, max_delay=0.05) as predict:
        ys = [f.result(10) for f in [predict.submit(s) for s in seqs]]
    assert [int(y["n"]) for y in ys] == [2, 5]


def test_autocast_bf16_runs_the_model_in_bf16():
    with batched_model(mlp(), autocast="bf16", max_delay=0) as predict:
        assert predict(torch.randn(16)).dtype == torch.bfloat16
    with batched_model(mlp(), max_delay=0) as predict:
        assert predict(torch.randn(16)).dtype == torch.float32


def test_the_factory_runs_in_the_worker_thread_and_gets_its_device():
    calls = []

    def load(device):
        calls.append((threading.current_thread().name, device))
        return mlp()

    with batched_model(load, max_delay=0) as predict:
        predict.start()
        assert calls and calls[0][0] != threading.current_thread().name
        assert calls[0][1] == torch.device("cpu")
        assert predict(torch.randn(16)).shape == (4,)


def test_allowed_batch_sizes_pad_the_batch_and_drop_padding_rows():
    model = mlp()
    rec = Recorder(model)
    xs = [torch.randn(16) for _ in range(4)]
    with batched_model(rec, allowed_batch_sizes=(1, 2, 4, 8), max_delay=0.05) as predict:
        first, gate = hold_first_batch(predict, rec, xs[0])
        futs = [predict.submit(x) for x in xs[1:]]
        gate.set()
        ys = [first.result(10)] + [f.result(10) for f in futs]
        assert predict.config.max_batch_size == 8
    assert [s for s, _, _ in rec.seen] == [(1, 16), (4, 16)]   # 3 real rows + 1 padding
    with torch.no_grad():
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, model(x[None])[0])
    assert len(ys) == 4


def test_several_devices_get_one_replica_each_sharing_one_queue():
    made = []

    def load():
        m = Recorder(mlp())
        made.append(m)
        return m

    with batched_model(load, devices=["cpu", "cpu"], max_batch_size=4, max_delay=0.001) as predict:
        predict.start()
        assert len(made) == 2 and made[0] is not made[1]
        assert predict.config.num_workers == 2
        futs = [predict.submit(torch.randn(16)) for _ in range(200)]
        assert all(f.result(10).shape == (4,) for f in futs)
    for m in made:   # each replica only ever ran in one worker thread
        assert len({name for _, _, name in m.seen}) <= 1
    assert sum(s[0] for m in made for s, _, _ in m.seen) == 200


def test_pipelined_path_shares_one_model_and_gives_identical_results():
    xs = [torch.randn(16) for _ in range(64)]
    loads = []

    def load():
        loads.append(1)
        return mlp()

    outs = {}
    for pipeline in (False, True):
        with batched_model(load, pipeline=pipeline, max_batch_size=8, max_delay=0.001) as predict:
            assert predict.config.num_workers == (2 if pipeline else 1)
            outs[pipeline] = torch.stack([f.result(10) for f in [predict.submit(x) for x in xs]])
    assert len(loads) == 2   # one per batched_model: the pipelined workers share theirs
    torch.testing.assert_close(outs[True], outs[False])


def test_a_wrong_shape_fails_only_its_own_request():
    rec = Recorder(mlp())
    xs = [torch.randn(16), torch.randn(16), torch.randn(7), torch.randn(16)]
    with batched_model(rec, max_batch_size=8, max_delay=0.05) as predict:
        first, gate = hold_first_batch(predict, rec, xs[0])
        futs = [predict.submit(x) for x in xs[1:]]
        gate.set()
        assert first.result(10).shape == (4,)
        assert futs[0].result(10).shape == (4,)
        with pytest.raises(ValueError, match=r"invalid input: expected shape \(16,\) and dtype "
                                             r"torch.float32 \(got shape \(7,\)\)"):
            futs[1].result(10)
        assert futs[2].result(10).shape == (4,)
        # the learned spec is enforced for a lone bad input too; the worker lives on
        with pytest.raises(TypeError, match=r"expected shape \(16,\) .*got dtype torch.float64"):
            predict(torch.randn(16, dtype=torch.float64))
        with pytest.raises(TypeError, match="expected a tensor, a numpy array.*got str"):
            predict("not a tensor")
        assert predict(torch.randn(16)).shape == (4,)
        assert predict.healthy


def test_input_spec_is_enforced_from_the_first_batch():
    spec = {"input_ids": TensorSpec((None,), torch.int64)}
    with batched_model(MaskedMean(seed=1), input_spec=spec, pad=True, max_delay=0) as predict:
        with pytest.raises(ValueError, match=r"invalid input\['input_ids'\]: expected shape \(None,\)"):
            predict({"input_ids": torch.zeros(2, 3, dtype=torch.int64)})
        with pytest.raises(ValueError, match=r"expected keys \['input_ids'\]"):
            predict({"ids": torch.zeros(2, dtype=torch.int64)})
        assert predict({"input_ids": torch.tensor([1, 2, 3])}).shape == (8,)


def test_a_model_error_fails_its_batch_and_the_worker_survives():
    state = {"fail": True}

    def model(x):
        if state["fail"]:
            raise RuntimeError("boom")
        return x * 2

    with batched_model(lambda: model, max_delay=0) as predict:
        with pytest.raises(RuntimeError, match="boom"):
            predict(torch.ones(3))
        state["fail"] = False
        torch.testing.assert_close(predict(torch.ones(3)), torch.full((3,), 2.0))


def test_an_output_without_the_batch_dim_is_a_clear_error():
    with batched_model(lambda: (lambda x: x.sum()), max_delay=0) as predict:
        with pytest.raises(BatchedFnError, match=r"model output has shape \(\); expected dim 0"):
            predict(torch.ones(3))


def test_acall(run_async):
    model = mlp()

    async def main():
        import asyncio
        with batched_model(model, max_batch_size=16, max_delay=0.01) as predict:
            xs = [torch.randn(16) for _ in range(16)]
            ys = await asyncio.gather(*(predict.acall(x) for x in xs))
            return xs, ys, predict.stats()

    xs, ys, stats = run_async(main())
    with torch.no_grad():
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, model(x[None])[0])
    assert stats.mean_batch_size > 1


def test_a_failing_factory_closes_with_the_cause():
    def load():
        raise OSError("no weights")

    predict = batched_model(load)
    with pytest.raises(Closed, match="OSError"):
        predict.start()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"device": "gpu-ish"}, ValueError, "invalid device value"),
    ({"device": "cpu", "devices": ["cpu"]}, ValueError, "give device or devices"),
    ({"devices": []}, ValueError, "invalid devices value"),
    ({"autocast": "fp8"}, ValueError, "invalid autocast value.*'fp8'"),
    ({"allowed_batch_sizes": (0, 4)}, ValueError, "invalid allowed_batch_sizes value"),
    ({"allowed_batch_sizes": (1, 4), "max_batch_size": 8}, ValueError, "invalid max_batch_size value"),
    ({"pipeline": "yes"}, ValueError, "invalid pipeline value"),
    ({"num_workers": 3}, TypeError, "invalid num_workers argument"),
    ({"call": 3}, TypeError, "invalid call value"),
    ({"input_spec": "x"}, TypeError, "invalid input_spec value"),
])
def test_invalid_arguments_name_themselves(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        batched_model(mlp(), **kwargs)
