"""batched_model: a torch model behind batched_fn, in one call.

This module imports torch only when a model is built, so ``import
batched_fn.torch`` works (and says what is missing) without torch.

Shared state (no GIL assumed): ``broken`` is a dict changed by single item
stores (atomic); ``_warm_lock`` serialises warm-up; everything else is set
once before the workers start.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any, Callable, Mapping, Sequence

from .._api import BatchedFn
from .._config import Config
from ..errors import BatchedFnError, Failed

__all__ = ["batched_model", "BatchedModel"]

#: the batched_fn knobs batched_model passes on as they are
_PASSED_ON = ("channel_cap", "on_full", "cost", "max_batch_cost", "on_batch", "batch_key", "max_keys")

_AUTOCAST_NAMES = {"fp16": "float16", "float16": "float16", "half": "float16",
                   "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is installed in CI
        raise ImportError("batched_fn.torch needs torch: pip install 'batched_fn[torch]'") from exc
    return torch


def _autocast_dtype(torch: Any, autocast: Any) -> Any:
    if autocast is None or autocast is False:
        return None
    if isinstance(autocast, str) and autocast.lower() in _AUTOCAST_NAMES:
        return getattr(torch, _AUTOCAST_NAMES[autocast.lower()])
    if autocast in (torch.float16, torch.bfloat16):
        return autocast
    raise ValueError(f"invalid autocast value: expected None, 'fp16', 'bf16', torch.float16 "
                     f"or torch.bfloat16 (got {autocast!r})")


def _allowed_sizes(allowed: Sequence[int] | None, max_batch_size: int | None) -> tuple[tuple[int, ...] | None, int]:
    if allowed is None:
        return None, 32 if max_batch_size is None else max_batch_size
    sizes = tuple(sorted(set(allowed))) if not isinstance(allowed, (str, bytes)) else ()
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"invalid allowed_batch_sizes value: expected a non-empty sequence of "
                         f"ints >= 1 (got {allowed!r})")
    if max_batch_size is None:
        max_batch_size = sizes[-1]
    elif isinstance(max_batch_size, int) and max_batch_size > sizes[-1]:
        raise ValueError(f"invalid max_batch_size value: expected at most the largest allowed batch "
                         f"size {sizes[-1]} (got {max_batch_size!r})")
    return sizes, max_batch_size


def _trim_fields(trim_outputs: Any, pad: bool) -> tuple[bool, tuple[Any, ...] | None]:
    """(trim?, named fields or None) from the trim_outputs argument."""
    if trim_outputs is False:
        return False, None
    if trim_outputs is True:
        fields = None
    elif (isinstance(trim_outputs, (tuple, list)) and trim_outputs
          and all(isinstance(f, (str, int)) and not isinstance(f, bool) for f in trim_outputs)):
        fields = tuple(trim_outputs)
    else:
        raise TypeError(f"invalid trim_outputs value: expected a bool or a list of field names "
                        f"(got {trim_outputs!r})")
    if not pad:
        raise ValueError(f"invalid trim_outputs value: it needs pad=True "
                         f"(got trim_outputs={trim_outputs!r}, pad=False)")
    return True, fields


def _bucket_key(bucket_lengths: Any, pad: bool, batch_key: Any) -> Any:
    """The batch_key: length buckets of the token count with bucket_lengths, else batch_key as given."""
    if not isinstance(bucket_lengths, bool):
        raise TypeError(f"invalid bucket_lengths value: expected a bool (got {bucket_lengths!r})")
    if not bucket_lengths:
        return batch_key
    if not pad:
        raise ValueError("invalid bucket_lengths value: it needs pad=True (got bucket_lengths=True, pad=False)")
    if batch_key is not None:
        raise ValueError("bucket_lengths=True sets batch_key: give one or the other")
    from .._buckets import length_buckets
    from .lengths import sequence_length
    return length_buckets(sequence_length)


class BatchedModel(BatchedFn[Any, Any]):
    """What :func:`batched_model` returns: a :class:`~batched_fn.BatchedFn` that owns its models.

    ``healthy`` is also False once a device's CUDA context is broken (a
    device-side assert, an illegal address): every later batch there would
    fail, so a health check should replace the process.  ``close()`` also
    drops the models, so a closed function keeps no GPU memory.
    """

    _runner: Any
    _pool: Any

    @property
    def healthy(self) -> bool:
        """True while every worker runs, calls are accepted and no device is broken."""
        return super().healthy and not self._runner.broken

    def close(self, timeout: float | None = None) -> None:
        """As :meth:`BatchedFn.close`, then release the models (and the GPU memory they hold)."""
        super().close(timeout)
        self._pool.release()


class _Runner:
    """One batched_model's batch path: admit inputs, run the model, hand out rows."""

    def __init__(self, *, spec: Any, pad: bool, pad_value: Any,
                 allowed: tuple[int, ...] | None, max_batch_size: int, out_dev: Any,
                 fields: Any, trim: bool, trim_fields: tuple[Any, ...] | None) -> None:
        from .output import mover
        self.spec = spec
        self.pad = pad
        self.pad_value = pad_value
        self.allowed = allowed
        self.max_batch_size = max_batch_size
        self.out_dev = out_dev
        self.move = mover(out_dev)
        self.fields = fields
        self.trim = trim
        self.trim_fields = trim_fields
        #: device -> the error that broke its CUDA context (written by workers, read by healthy)
        self.broken: dict[Any, BaseException] = {}
        # guards warm-up: one worker at a time, so two workers sharing a model
        # never fill its lazily grown caches concurrently
        self._warm_lock = threading.Lock()

    def admit(self, inputs: list[Any], results: list[Any]) -> tuple[list[int], list[Any], Any]:
        """Turn inputs into CPU tensors and check them; a bad one gets its own Failed."""
        from .spec import check, infer_spec
        from .tree import to_host, to_tensors
        examples: list[tuple[int, Any]] = []
        for i, x in enumerate(inputs):
            try:
                examples.append((i, to_host(to_tensors(x))))
            except Exception as exc:   # any failure here is this input's alone
                results[i] = Failed(exc)
        spec = self.spec
        if spec is None and examples:
            spec = infer_spec([ex for _, ex in examples], self.pad)
        idx, good = [], []
        for i, ex in examples:
            try:
                check(ex, spec)
            except Exception as exc:
                results[i] = Failed(exc)
            else:
                idx.append(i)
                good.append(ex)
        return idx, good, spec

    def rows(self, examples: list[Any], replica: Any, spec: Any, size: int) -> list[Any]:
        """Run one batch; return its rows, complete and owned (see output.py)."""
        from .collate import collate
        from .output import make_ready, own_rows
        from .split import select_fields, split, trim_rows
        from .tree import leaves
        n = len(examples)
        batch = collate(examples, spec, pad_value=self.pad_value, size=size, pin=replica.pin)
        with replica.stream():
            out = replica.forward(replica.to_device(batch))
            rows = split(select_fields(out, self.fields), n, size, move=self.move)
            del out, batch
            if self.trim:
                own = [max((t.shape[0] for t in leaves(ex) if t.dim() > 0), default=0) for ex in examples]
                rows = trim_rows(rows, own, max(own, default=0), self.trim_fields)
            if self.out_dev is None:
                rows = own_rows(rows)
            make_ready(rows, replica)
        return rows

    def run(self, idx: list[int], examples: list[Any], spec: Any, replica: Any,
            results: list[Any], retry: bool) -> bool:
        """Fill results[idx] with rows or with the batch's error; True if the model ran."""
        from .collate import next_allowed_size
        from .devices import is_oom, is_sticky
        try:
            rows = self.rows(examples, replica, spec, next_allowed_size(len(examples), self.allowed))
        except Exception as exc:
            # The traceback's frames hold the batch's inputs and activations:
            # clear them, or that memory lives as long as a caller keeps exc.
            traceback.clear_frames(exc.__traceback__)
            if is_sticky(exc):
                self.broken.setdefault(replica.device, exc)
            if not (retry and is_oom(exc) and len(examples) > 1):
                for i in idx:
                    results[i] = Failed(exc)
                return False
        else:
            for i, row in zip(idx, rows):
                results[i] = row
            return True
        # Out of memory: once, each half of the batch on its own.
        half = len(examples) // 2
        first = self.run(idx[:half], examples[:half], spec, replica, results, False)
        second = self.run(idx[half:], examples[half:], spec, replica, results, False)
        return first or second

    def handle(self, inputs: list[Any], replica: Any) -> list[Any]:
        """The batched_fn handler."""
        broken = self.broken.get(replica.device)
        if broken is not None:
            first_line = str(broken).strip().splitlines()[0] if str(broken).strip() else ""
            raise BatchedFnError(
                f"device {replica.device} is unusable after an earlier CUDA error "
                f"({type(broken).__name__}: {first_line}); restart the process") from broken
        results: list[Any] = [None] * len(inputs)
        idx, good, spec = self.admit(inputs, results)
        if good and self.run(idx, good, spec, replica, results, True) and self.spec is None:
            self.spec = spec   # the model accepted it: enforce it from now on
        return results

    def warm_up(self, replica: Any, example: Any) -> None:
        """Run example once per allowed batch size (else at max_batch_size) on replica."""
        from .spec import check, infer_spec
        from .tree import to_host, to_tensors
        ex = to_host(to_tensors(example, "warmup"))
        spec = self.spec if self.spec is not None else infer_spec([ex], self.pad)
        check(ex, spec, "warmup")
        with self._warm_lock:
            for size in self.allowed or (self.max_batch_size,):
                self.rows([ex], replica, spec, size)


def _check_passed_on(batched_fn_config: Mapping[str, Any]) -> None:
    """The keyword arguments batched_model hands on to batched_fn: known ones only."""
    for name in batched_fn_config:
        if name in ("num_workers", "context"):
            raise TypeError(f"invalid {name} argument: batched_model sets it from devices and pipeline")
        if name not in _PASSED_ON:
            raise TypeError(f"invalid {name} argument: batched_model takes no such argument")


def batched_model(
    load_model: Any,
    *,
    device: Any = None,
    devices: Sequence[Any] | None = None,
    max_batch_size: int | None = None,
    max_delay: float = 0.005,
    input_spec: Any = None,
    pad: bool = False,
    pad_value: Any = 0,
    trim_outputs: bool | Sequence[str | int] = False,
    allowed_batch_sizes: Sequence[int] | None = None,
    autocast: Any = None,
    output_device: Any = "cpu",
    fields: Any = None,
    pipeline: bool = False,
    warmup: Any = "auto",
    call: Callable[[Any, Any], Any] | None = None,
    bucket_lengths: bool = False,
    **batched_fn_config: Any,
) -> BatchedModel:
    """Turn a model into a function of one example that runs it on batches.

    ``predict = batched_model(load_model, device="cuda")``; then ``predict(x)``
    or ``await predict.acall(x)``, where x is one example: a tensor without
    the batch dim, a numpy array, or a dict/tuple of them (a tokenizer's
    output for one text).  The result is a :class:`BatchedModel` (a
    :class:`~batched_fn.BatchedFn`).

    Each batch: every example is made a detached CPU tensor and checked
    against the expected spec (a bad one fails alone, with a message naming
    the expected shape); the rest are collated (stacked, or padded with an
    attention mask when ``pad``), padded up to an allowed batch size, written
    to pinned memory and copied to the device with ``non_blocking=True`` on
    the worker's stream; the model runs there under
    ``torch.inference_mode()`` (and autocast); its output (tensor, dict or
    tuple with the batch along dim 0, or a list of one dict per example) is
    copied to ``output_device`` and split so each caller gets its own row.
    The worker waits for its stream once, so every output is complete when
    the call returns.

    A model error fails its batch (its traceback's frames are cleared, so the
    batch's memory is freed at once); on out-of-memory the batch is retried
    once as two halves.  A CUDA error that breaks the device's context (a
    device-side assert) makes ``healthy`` False and fails later batches at
    once.

    Args:
        load_model: a factory called once per device in that device's worker
            thread, with that device current (as ``load_model(device=...)``
            if it takes ``device``, ``load_model(device)`` if it takes one
            required argument, else ``load_model()``), or an ``nn.Module``
            (with several devices: on the CPU, deep-copied for each device).
            An ``nn.Module`` result is moved to the device unless it is
            there already, spread over several devices, or quantized
            (``hf_device_map``, ``is_loaded_in_8bit``/``4bit``), and put in
            eval mode.
        device: one device ("cpu", "cuda:0"; "cuda" is the current CUDA
            device of the calling thread); default "cpu".
        devices: several devices, one replica each, sharing one queue
            (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` for two CPU replicas).
        max_batch_size: most examples per batch (default 32, or the largest
            allowed batch size).
        max_delay: seconds a batch waits for more examples after its first.
        input_spec: what one example looks like: a ``TensorSpec``, a shape
            tuple, or a dict/tuple of them.  None: learned from the first batch
            that runs (the shape most of its examples share), then enforced.
        pad: examples may differ in their first dim (token ids); they are
            padded to the longest in the batch and an attention mask is made.
        pad_value: the padding value, or a dict field -> value
            (``attention_mask`` fields are padded with 0 unless said otherwise).
        trim_outputs: with ``pad``, cut each caller's token-level outputs
            back to its own length: True cuts row tensors of 2 dims or more
            whose first dim is the padded length (``[L, H]``; never a pooled
            ``[H]``); a list of field names (or tuple indices) cuts exactly
            those fields.
        allowed_batch_sizes: pad each batch up to the next of these sizes
            (repeating its last example) so compiled kernels see few shapes;
            the padding rows' outputs are dropped.
        autocast: None, "fp16" or "bf16" (or the torch dtype).
        output_device: where callers get their outputs ("cpu", the default;
            rows are views of one copy of the batch's output); None leaves
            them on the model's device, each row cloned into its own memory.
        fields: keep only these fields of a dict/ModelOutput/tuple output
            before anything is copied: one name gives callers that field
            itself, a list gives a dict (or tuple) of those fields.
        pipeline: two workers per device sharing its model, each with its
            own stream, so one batch's copies overlap another's forward pass.
            Off by default: two batches in flight need about twice the
            activation memory.
        warmup: an example run once per allowed batch size (else at
            max_batch_size) in each worker at start; "auto" (default): a
            tensor of ones made from ``input_spec`` when it gives every dtype;
            None or False: no warm-up.
        call: ``call(model, batch) -> output`` if the default (``model(x)``,
            ``model(**dict)``, ``model(*tuple)``, ``model(values, mask)``) does
            not fit.
        bucket_lengths: with ``pad``, batch examples of similar length
            together: ``batch_key=length_buckets(sequence_length)``
            (powers of two of the token count), so a batch pads little.
            For other edges pass ``batch_key=length_buckets(...)`` instead.
        **batched_fn_config: channel_cap, on_full, on_batch, cost,
            max_batch_cost, batch_key, max_keys: passed on to
            :func:`~batched_fn.batched_fn`.

    Raises:
        ValueError, TypeError: an argument is invalid; the message names it.
        ImportError: torch is not installed.
    """
    torch = _import_torch()
    from .devices import resolve_device, resolve_devices
    from .replica import ModelPool, Replica, default_call
    from .spec import example_of, normalize_spec
    from .split import check_fields

    _check_passed_on(batched_fn_config)
    devs = resolve_devices(device, devices)
    autocast_dtype = _autocast_dtype(torch, autocast)
    allowed, max_batch_size = _allowed_sizes(allowed_batch_sizes, max_batch_size)
    if not isinstance(pipeline, bool):
        raise ValueError(f"invalid pipeline value: expected True or False (got {pipeline!r})")
    if call is None:
        call = default_call
    elif not callable(call):
        raise TypeError(f"invalid call value: expected a callable (got {call!r})")
    if not isinstance(pad, bool):
        raise TypeError(f"invalid pad value: expected a bool (got {pad!r})")
    trim, trim_fields = _trim_fields(trim_outputs, pad)
    batch_key = _bucket_key(bucket_lengths, pad, batched_fn_config.get("batch_key"))
    out_dev = None if output_device is None else resolve_device(output_device)
    spec = None if input_spec is None else normalize_spec(input_spec)
    if isinstance(warmup, str) and warmup == "auto":
        warmup = None if spec is None else example_of(spec)
    elif warmup is False:
        warmup = None
    workers_per_device = 2 if pipeline else 1
    pool = ModelPool(load_model, devs, workers_per_device)
    runner = _Runner(spec=spec, pad=pad, pad_value=pad_value, allowed=allowed,
                     max_batch_size=max_batch_size, out_dev=out_dev, fields=check_fields(fields),
                     trim=trim, trim_fields=trim_fields)

    def make_replica() -> Replica:
        dev, model = pool.claim()
        replica = Replica(model, dev, call=call, autocast=autocast_dtype)
        if warmup is not None:
            runner.warm_up(replica, warmup)
        return replica

    def handler(inputs: list[Any], replica: Replica) -> list[Any]:
        return runner.handle(inputs, replica)

    handler.__name__ = getattr(load_model, "__name__", type(load_model).__name__)
    config = Config.build(
        max_batch_size=max_batch_size, max_delay=max_delay,
        num_workers=len(devs) * workers_per_device, context={"replica": make_replica},
        channel_cap=batched_fn_config.get("channel_cap"), on_full=batched_fn_config.get("on_full", "reject"),
        cost=batched_fn_config.get("cost"), max_batch_cost=batched_fn_config.get("max_batch_cost"),
        on_batch=batched_fn_config.get("on_batch"), batch_key=batch_key,
        max_keys=batched_fn_config.get("max_keys"))
    fn = BatchedModel(handler, config)
    fn._runner = runner
    fn._pool = pool
    return fn
