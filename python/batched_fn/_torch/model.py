"""batched_model: a torch model behind batched_fn, in one call.

This module imports torch only when a model is built, so ``import
batched_fn.torch`` works (and says what is missing) without torch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .._api import BatchedFn, batched_fn
from ..errors import Failed

__all__ = ["batched_model"]

_AUTOCAST_NAMES = {"fp16": "float16", "float16": "float16", "half": "float16",
                   "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is installed in CI
        raise ImportError("batched_fn.torch needs torch: pip install 'batched_fn[torch]'") from exc
    return torch


def _devices(torch: Any, device: Any, devices: Sequence[Any] | None) -> list[Any]:
    if devices is not None:
        if device is not None:
            raise ValueError(f"invalid device value: give device or devices, not both (got {device!r})")
        if isinstance(devices, (str, bytes)) or not len(devices):
            raise ValueError(f"invalid devices value: expected a non-empty list of devices (got {devices!r})")
        names = list(devices)
    else:
        names = ["cpu" if device is None else device]
    out = []
    for name in names:
        try:
            out.append(torch.device(name))
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"invalid device value: expected a torch device such as 'cpu' or "
                             f"'cuda:0' (got {name!r})") from exc
    return out


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
    trim_outputs: bool = False,
    allowed_batch_sizes: Sequence[int] | None = None,
    autocast: Any = None,
    output_device: Any = "cpu",
    pipeline: bool | str = "auto",
    call: Callable[[Any, Any], Any] | None = None,
    **batched_fn_config: Any,
) -> BatchedFn[Any, Any]:
    """Turn a model into a function of one example that runs it on batches.

    ``predict = batched_model(load_model, device="cuda")``; then ``predict(x)``
    or ``await predict.acall(x)``, where x is one example: a tensor without
    the batch dim, a numpy array, or a dict/tuple of them (a tokenizer's
    output for one text).  The result is a :class:`~batched_fn.BatchedFn`.

    Each batch: every example is checked against the expected spec (a bad one
    fails alone, with a message naming the expected shape); the rest are
    collated (stacked, or padded with an attention mask when ``pad``), padded
    up to an allowed batch size, written to pinned memory and copied to the
    device with ``non_blocking=True``; the model runs under
    ``torch.inference_mode()`` (and autocast); its output (tensor, dict or
    tuple, batch along dim 0) is split so each caller gets its own row.

    Pipelining (``pipeline``): each device gets two workers sharing one model
    replica, each with its own CUDA copy and compute streams.  While one
    worker's batch runs, the other collates the next batch and copies it to
    the device on its copy stream; the compute stream waits on the copy's
    event.  The overlap therefore comes from two batches in flight, not from
    one worker.  On CPU the same two workers overlap collation with compute.

    Args:
        load_model: a factory called once per device in that device's worker
            thread (as ``load_model(device=...)`` if it takes ``device``,
            ``load_model(device)`` if it takes one required argument, else
            ``load_model()``), or an ``nn.Module`` (deep-copied for each
            further device).  An ``nn.Module`` result is moved to the device
            and put in eval mode.
        device: one device ("cpu", "cuda:0"); default "cpu".
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
        trim_outputs: with ``pad``, cut each caller's output tensors whose
            first dim is the batch's padded length back to that caller's own
            length (token-level outputs: one row per real token, none for
            padding).  Off by default: a model's per-position output may be
            meant to keep the padded length.
        allowed_batch_sizes: pad each batch up to the next of these sizes
            (repeating its last example) so compiled kernels see few shapes;
            the padding rows' outputs are dropped.
        autocast: None, "fp16" or "bf16" (or the torch dtype).
        output_device: where callers get their outputs ("cpu", the default);
            None leaves them on the model's device.
        pipeline: True, False, or "auto" (True when a device is CUDA).
        call: ``call(model, batch) -> output`` if the default (``model(x)``,
            ``model(**dict)``, ``model(*tuple)``, ``model(values, mask)``) does
            not fit.
        **batched_fn_config: channel_cap, on_full, on_batch, cost,
            max_batch_cost: passed on to :func:`~batched_fn.batched_fn`.

    Raises:
        ValueError, TypeError: an argument is invalid; the message names it.
        ImportError: torch is not installed.
    """
    torch = _import_torch()
    from .collate import collate, next_allowed_size
    from .replica import ModelPool, Replica, default_call
    from .spec import check, infer_spec, normalize_spec
    from .split import split
    from .tree import leaves, map_leaves, to_tensors

    for name in ("num_workers", "context"):
        if name in batched_fn_config:
            raise TypeError(f"invalid {name} argument: batched_model sets it from devices and pipeline")
    devs = _devices(torch, device, devices)
    autocast_dtype = _autocast_dtype(torch, autocast)
    allowed, max_batch_size = _allowed_sizes(allowed_batch_sizes, max_batch_size)
    if pipeline == "auto":
        pipeline = any(d.type == "cuda" for d in devs)
    elif not isinstance(pipeline, bool):
        raise ValueError(f"invalid pipeline value: expected True, False or 'auto' (got {pipeline!r})")
    if call is None:
        call = default_call
    elif not callable(call):
        raise TypeError(f"invalid call value: expected a callable (got {call!r})")
    if not isinstance(pad, bool):
        raise TypeError(f"invalid pad value: expected a bool (got {pad!r})")
    if not isinstance(trim_outputs, bool):
        raise TypeError(f"invalid trim_outputs value: expected a bool (got {trim_outputs!r})")
    if trim_outputs and not pad:
        raise ValueError("invalid trim_outputs value: it needs pad=True (got trim_outputs=True, pad=False)")
    out_dev = None if output_device is None else _devices(torch, output_device, None)[0]
    state = {"spec": None if input_spec is None else normalize_spec(input_spec)}
    workers_per_device = 2 if pipeline else 1
    pool = ModelPool(load_model, devs, workers_per_device)

    def make_replica() -> Replica:
        dev, model = pool.claim()
        return Replica(model, dev, call=call, autocast=autocast_dtype,
                       pin=dev.type == "cuda", side_stream=pipeline)

    def handler(inputs: list[Any], replica: Replica) -> list[Any]:
        results: list[Any] = [None] * len(inputs)
        examples: list[tuple[int, Any]] = []
        for i, x in enumerate(inputs):
            try:
                examples.append((i, to_tensors(x)))
            except TypeError as exc:
                results[i] = Failed(exc)
        spec = state["spec"]
        learned = spec is None and bool(examples)
        if learned:
            spec = infer_spec([ex for _, ex in examples], pad)
        good_idx, good = [], []
        for i, ex in examples:
            try:
                check(ex, spec)
            except (TypeError, ValueError) as exc:
                results[i] = Failed(exc)
            else:
                good_idx.append(i)
                good.append(ex)
        if not good:
            return results
        size = next_allowed_size(len(good), allowed)
        batch = collate(good, spec, pad_value=pad_value, size=size, pin=replica.pin)
        moved, event = replica.prepare(batch)
        with replica.stream():
            out = replica.run(moved, event)
            rows = split(out, len(good), size, out_dev)
            if out_dev is None and replica.is_cuda:
                # Callers use their rows on their own (default) stream.
                for t in leaves(rows):
                    t.record_stream(torch.cuda.default_stream(replica.device))
                replica.compute_stream.synchronize()
        if learned:
            state["spec"] = spec   # the model accepted it: enforce it from now on
        if trim_outputs:
            rows = _trim_rows(rows, good)
        for i, row in zip(good_idx, rows):
            results[i] = row
        return results

    def _trim_rows(rows: list[Any], examples: list[Any]) -> list[Any]:
        """Cut padded-length dims of each row back to its example's own length."""
        own = [max((t.shape[0] for t in leaves(ex) if t.dim() > 0), default=0) for ex in examples]
        padded = max(own, default=0)
        return [map_leaves(lambda t, n=n: t[:n] if t.dim() > 0 and t.shape[0] == padded else t, row)
                for row, n in zip(rows, own)]

    handler.__name__ = getattr(load_model, "__name__", type(load_model).__name__)
    return batched_fn(handler, max_batch_size=max_batch_size, max_delay=max_delay,
                      num_workers=len(devs) * workers_per_device,
                      context={"replica": make_replica}, **batched_fn_config)
