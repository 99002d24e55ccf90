"""batched_model: the GPU-path faults that a CPU can show.

Each test failed before its fix.
"""

from __future__ import annotations

import gc
import re
import threading
import weakref

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from batched_fn import BatchedFnError, Closed  # noqa: E402
from batched_fn._torch.devices import is_sticky, resolve_devices  # noqa: E402
from batched_fn.torch import Padded, TensorSpec, batched_model  # noqa: E402


def mlp(width: int = 16) -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


class Gated:
    """A model function that holds its first batch until released, so others queue up."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.first = True

    def __call__(self, x):
        self.sizes.append(len(x))
        if self.first:
            self.first = False
            self.entered.set()
            assert self.gate.wait(10)
        return self.fn(x)


def run_together(predict, gated: Gated, xs: list) -> list:
    """Run xs[0] alone (held), queue the rest, release: the rest form one batch."""
    first = predict.submit(xs[0])
    assert gated.entered.wait(10)
    futs = [predict.submit(x) for x in xs[1:]]
    gated.gate.set()
    return [first] + futs


# ---------------------------------------------------------------- 2: the model pool

class Tracked(torch.nn.Module):
    """A module whose eval() waits for a second loader, so two loads overlap."""

    barrier: threading.Barrier | None = None
    evaluated: list[int] = []

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def eval(self):
        Tracked.evaluated.append(id(self))
        if Tracked.barrier is not None:
            try:
                Tracked.barrier.wait(2)
            except threading.BrokenBarrierError:
                pass
        return super().eval()

    def forward(self, x):
        return self.lin(x)


def test_two_devices_never_share_one_module_object():
    # both slots loading at once both took the caller's module
    Tracked.barrier, Tracked.evaluated = threading.Barrier(2), []
    original = Tracked()
    try:
        with batched_model(original, devices=["cpu", "cpu"], max_delay=0) as predict:
            predict.start()
            assert predict(torch.ones(4)).shape == (2,)
    finally:
        Tracked.barrier = None
    assert len(Tracked.evaluated) == 2
    assert len(set(Tracked.evaluated)) == 2
    assert id(original) not in Tracked.evaluated   # each device copies the CPU template


def test_a_factory_returning_one_object_for_two_devices_is_refused():
    shared = mlp()
    predict = batched_model(lambda: shared, devices=["cpu", "cpu"])
    with pytest.raises(Closed) as info:
        predict.start()
    assert isinstance(info.value.__cause__, ValueError)
    assert re.search(re.escape("invalid load_model value: it returned the same object for cpu and cpu; "
                               "return a new model per call"), str(info.value.__cause__))
    predict.close()


def test_a_module_off_the_cpu_is_refused_for_several_devices():
    with torch.device("meta"):
        on_meta = mlp()
    with pytest.raises(ValueError, match=re.escape(
            "invalid load_model value: with several devices, pass a module on the cpu (each device "
            "gets a copy of it) or a factory (got a module on meta)")):
        batched_model(on_meta, devices=["cpu", "cpu"])


# ---------------------------------------------------------------- 3: placing the model

class NoMove(torch.nn.Module):
    """Records .to() calls; forward doubles its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.moves: list = []

    def to(self, *args, **kwargs):
        self.moves.append(args)
        return super().to(*args, **kwargs)

    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("how", ["hf_device_map", "is_loaded_in_8bit", "several_devices", "placed"])
def test_a_self_placed_model_is_not_moved(how):
    # .to(device) was forced on every factory result
    model = NoMove()
    if how == "several_devices":
        with torch.device("meta"):
            model.extra = torch.nn.Linear(2, 2)
    elif how != "placed":
        setattr(model, how, {"": 0} if how == "hf_device_map" else True)
    with batched_model(lambda: model, max_delay=0) as predict:
        torch.testing.assert_close(predict(torch.ones(3)), torch.full((3,), 2.0))
    assert model.moves == []
    assert not model.training


# ---------------------------------------------------------------- 4 and 13.10: one input, one failure

def test_inputs_that_used_to_fail_their_batch_fail_alone_or_work():
    # negative strides, another device, errors other than TypeError, and requires_grad
    class BadMapping:
        def keys(self):
            raise KeyError("broken mapping")

        def __getitem__(self, key):
            raise KeyError(key)

    gated = Gated(lambda x: x * 2)
    flipped = np.arange(8, dtype=np.float32)[::-1]
    grad = torch.ones(8, requires_grad=True)
    meta = torch.empty(8, device="meta")
    xs = [torch.zeros(8), flipped, grad, meta, BadMapping(), torch.full((8,), 3.0)]
    with batched_model(lambda: gated, max_batch_size=8, max_delay=0.05) as predict:
        futs = run_together(predict, gated, xs)
        torch.testing.assert_close(futs[1].result(10), torch.from_numpy(flipped.copy()) * 2)
        torch.testing.assert_close(futs[2].result(10), torch.full((8,), 2.0))
        with pytest.raises(NotImplementedError):   # a meta tensor cannot be copied to the cpu
            futs[3].result(10)
        with pytest.raises(KeyError, match="broken mapping"):
            futs[4].result(10)
        torch.testing.assert_close(futs[5].result(10), torch.full((8,), 6.0))
        assert predict.healthy
    assert gated.sizes == [1, 3]


# ---------------------------------------------------------------- 5: out of memory

def test_an_out_of_memory_error_frees_the_batch_memory_at_once():
    # the traceback's frames kept the batch's tensors alive
    refs = []

    def model(x):
        activation = x.repeat(1, 1000)
        refs.append(weakref.ref(activation))
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with batched_model(lambda: model, max_delay=0) as predict:
        with pytest.raises(torch.OutOfMemoryError) as info:
            predict(torch.ones(4))
        assert info.value.__traceback__ is not None   # kept for the log, frames cleared
        assert refs and refs[0]() is None
        assert predict.healthy


def test_an_out_of_memory_batch_is_retried_once_as_two_halves():
    def model(x):
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return x * 2

    gated = Gated(model)
    xs = [torch.full((2,), float(i)) for i in range(5)]
    with batched_model(lambda: gated, max_batch_size=8, max_delay=0.05) as predict:
        futs = run_together(predict, gated, xs)
        for x, f in zip(xs, futs):
            torch.testing.assert_close(f.result(10), x * 2)
    assert gated.sizes == [1, 4, 2, 2]   # once: the halves are not split again


# ---------------------------------------------------------------- 6: sticky CUDA errors

def test_a_sticky_cuda_error_makes_the_function_unhealthy():
    calls = []

    def model(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
        return x

    with batched_model(lambda: model, max_delay=0) as predict:
        with pytest.raises(RuntimeError, match="device-side assert"):
            predict(torch.ones(2))
        assert not predict.healthy
        with pytest.raises(BatchedFnError, match=re.escape(
                "device cpu is unusable after an earlier CUDA error (RuntimeError: CUDA error: "
                "device-side assert triggered); restart the process")):
            predict(torch.ones(2))
    assert calls == [1]


def test_only_context_breaking_errors_are_sticky():
    assert is_sticky(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_sticky(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_sticky(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_sticky(ValueError("device-side assert triggered"))


# ---------------------------------------------------------------- 10: fields

def test_fields_selects_outputs_before_they_are_copied():
    def model(x):
        return {"pooled": x.sum(1), "hidden": x.repeat(1, 50)}

    with batched_model(lambda: model, fields="pooled", max_delay=0) as predict:
        torch.testing.assert_close(predict(torch.ones(3)), torch.tensor(3.0))
    with batched_model(lambda: model, fields=["pooled"], max_delay=0) as predict:
        assert list(predict(torch.ones(3))) == ["pooled"]
    with batched_model(lambda: model, fields="logits", max_delay=0) as predict:
        with pytest.raises(BatchedFnError, match=re.escape(
                "model output has no field 'logits' (it has ['pooled', 'hidden'])")):
            predict(torch.ones(3))
    with pytest.raises(TypeError, match=re.escape(
            "invalid fields value: expected a field name or index, or a non-empty list of them (got [])")):
        batched_model(lambda: model, fields=[])


# ---------------------------------------------------------------- 11: trim_outputs

def test_trim_outputs_never_cuts_a_pooled_output_that_matches_the_padded_length():
    # a pooled [B, H] output was cut when the batch was padded to H
    hidden = 4

    def model(ids, mask):
        tokens = ids.unsqueeze(-1).float().repeat(1, 1, hidden)
        return {"tokens": tokens, "pooled": tokens.sum(1), "ids": ids}

    gated = Gated(lambda b: model(b.values, b.attention_mask))
    seqs = [torch.arange(1, n + 1) for n in (1, 2, 4, 3)]   # padded to 4 == hidden
    with batched_model(lambda: gated, call=lambda m, b: m(b), pad=True, trim_outputs=True,
                       max_batch_size=4, max_delay=0.05) as predict:
        ys = [f.result(10) for f in run_together(predict, gated, seqs)]
    for s, y in zip(seqs[1:], ys[1:]):
        assert y["tokens"].shape == (len(s), hidden)
        assert y["pooled"].shape == (hidden,)
        assert y["ids"].shape == (4,)   # 1 dim: kept unless named
    named = Gated(lambda b: model(b.values, b.attention_mask))
    with batched_model(lambda: named, call=lambda m, b: m(b), pad=True, trim_outputs=["ids"],
                       max_batch_size=4, max_delay=0.05) as predict:
        ys = [f.result(10) for f in run_together(predict, named, seqs)]
    for s, y in zip(seqs[1:], ys[1:]):
        torch.testing.assert_close(y["ids"], s)
        assert y["tokens"].shape == (4, hidden)
    with pytest.raises(TypeError, match=re.escape("invalid trim_outputs value: expected a bool or a "
                                                  "list of field names (got 'yes')")):
        batched_model(lambda: model, pad=True, trim_outputs="yes")


# ---------------------------------------------------------------- 12: one dict per input

def test_a_list_of_one_dict_per_input_is_handed_out_per_caller():
    # a detection model's list of dicts failed the whole batch
    def detect(x):
        return [{"boxes": torch.zeros(int(v[0]), 4), "label": int(v[0])} for v in x]

    gated = Gated(detect)
    xs = [torch.full((2,), float(n)) for n in (1, 3, 0, 2)]
    with batched_model(lambda: gated, max_batch_size=4, max_delay=0.05) as predict:
        ys = [f.result(10) for f in run_together(predict, gated, xs)]
    assert [y["boxes"].shape[0] for y in ys] == [1, 3, 0, 2]
    assert [y["label"] for y in ys] == [1, 3, 0, 2]
    assert gated.sizes == [1, 3]


# ---------------------------------------------------------------- 13

def test_padded_lengths_stay_on_the_cpu_when_the_model_is_elsewhere():
    # lengths were moved with the batch (pack_padded_sequence wants them on the cpu)
    seen = []

    def call(model, batch: Padded):
        seen.append((batch.values.device.type, batch.attention_mask.device.type, batch.lengths.device.type))
        return batch.values.float().sum(1, keepdim=True)

    with batched_model(lambda: (lambda x: x), device="meta", pad=True, call=call, output_device=None,
                       max_delay=0) as predict:
        assert predict(torch.arange(3)).device.type == "meta"
    assert seen == [("meta", "meta", "cpu")]


def test_cuda_means_the_callers_current_device(monkeypatch):
    # "cuda" ignored torch.cuda.set_device
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_devices("cuda", None) == [torch.device("cuda", 1)]
    assert resolve_devices(None, ["cuda", "cuda:0"]) == [torch.device("cuda", 1), torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert resolve_devices("cuda", None) == [torch.device("cuda", 0)]   # without initializing CUDA


def test_close_releases_the_model():
    # close() kept the model (on the GPU) until the function object died
    made = []

    def load():
        m = mlp()
        made.append(weakref.ref(m))
        return m

    predict = batched_model(load, max_delay=0)
    assert predict(torch.ones(16)).shape == (4,)
    predict.close()
    gc.collect()
    assert made and made[0]() is None
    with pytest.raises(Closed):
        predict(torch.ones(16))


# ---------------------------------------------------------------- 7, 8: defaults and warm-up

def test_pipelining_is_off_by_default():
    predict = batched_model(mlp(), device="cpu")
    assert predict.config.num_workers == 1
    predict.close()
    with pytest.raises(ValueError, match=re.escape("invalid pipeline value: expected True or False (got 'auto')")):
        batched_model(mlp(), pipeline="auto")


def test_start_warms_up_each_allowed_batch_size():
    sizes = []

    def model(x):
        sizes.append(len(x))
        return x

    with batched_model(lambda: model, input_spec=TensorSpec((3,), torch.float32),
                       allowed_batch_sizes=(1, 4, 8)) as predict:
        predict.start()
        assert sizes == [1, 4, 8]
        assert predict(torch.ones(3)).shape == (3,)
    explicit = []
    with batched_model(lambda: (lambda x: explicit.append(len(x)) or x), warmup=torch.zeros(5),
                       max_batch_size=6) as predict:
        predict.start()
        assert explicit == [6]
    with batched_model(lambda: model, input_spec=TensorSpec((3,), torch.float32), warmup=False,
                       allowed_batch_sizes=(1, 4)) as predict:
        predict.start()
        assert sizes == [1, 4, 8, 1]


# ---------------------------------------------------------------- messages

def test_a_released_pool_refuses_to_load_again():
    from batched_fn._torch.replica import ModelPool
    pool = ModelPool(lambda: mlp(), [torch.device("cpu")], 1)
    assert pool.claim()[0] == torch.device("cpu")
    pool.release()
    with pytest.raises(RuntimeError, match=re.escape("the model pool was released: the function is closed")):
        pool.claim()


def test_an_unknown_argument_and_an_unsplittable_output_name_themselves():
    with pytest.raises(TypeError, match=re.escape("invalid max_batch_costs argument: batched_model takes "
                                                  "no such argument")):
        batched_model(mlp(), max_batch_costs=3)
    with batched_model(lambda: (lambda x: "text"), max_delay=0) as predict:
        with pytest.raises(BatchedFnError, match=re.escape(
                "model output is a str; expected a tensor, a dict/tuple of tensors with the batch along "
                "dim 0, or a list of one dict per input")):
            predict(torch.ones(2))


def test_pipelined_workers_warm_their_shared_model_up_one_at_a_time():
    # two workers share the model; its lazy caches must not be filled concurrently
    state = {"inside": 0, "most": 0, "sizes": []}
    lock = threading.Lock()

    def model(x):
        with lock:
            state["inside"] += 1
            state["most"] = max(state["most"], state["inside"])
            state["sizes"].append(len(x))
        threading.Event().wait(0.05)
        with lock:
            state["inside"] -= 1
        return x

    with batched_model(lambda: model, pipeline=True, warmup=torch.zeros(2), allowed_batch_sizes=(1, 4)) as predict:
        predict.start()
    assert state["sizes"] == [1, 4, 1, 4]
    assert state["most"] == 1
