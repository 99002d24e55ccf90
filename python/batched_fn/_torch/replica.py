"""One model replica per device: load it, move a batch there, run it.

Each worker has one CUDA stream: the batch's copy to the device, the forward
pass and the copies of the outputs all run on it, in that order, and the
worker waits for that stream once before handing outputs to callers.  With
pipelining two workers share a device (and its model), each with its own
stream, so one worker's copies overlap the other's forward pass.  On CPU the
same steps run with no streams.

Shared state (no GIL assumed): the pool's ``_lock`` guards its next slot, its
models and the factory; a slot's lock guards loading its replica; ``_copy_lock``
one deep copy of the template at a time; a replica is used by its own worker.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from typing import Any, Callable

import torch

from .collate import Padded
from .tree import map_leaves

__all__ = ["Replica", "ModelPool", "default_call", "device_context"]

#: attributes that say a module is placed by its own loader (sharded over
#: devices, or quantized): moving it again would break it
_SELF_PLACED = ("hf_device_map", "is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")


def default_call(model: Any, batch: Any) -> Any:
    """How a batch is passed to the model unless ``call=`` says otherwise.

    A tensor: ``model(x)``; a :class:`Padded`: ``model(values, attention_mask)``;
    a dict: ``model(**batch)``; a tuple/list: ``model(*batch)``.
    """
    if isinstance(batch, Padded):
        return model(batch.values, batch.attention_mask)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def device_context(device: torch.device) -> Any:
    """Make device the current CUDA device (a no-op for other devices)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _tensor_devices(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in module.parameters()} | {t.device for t in module.buffers()}


def _needs_move(module: torch.nn.Module, device: torch.device) -> bool:
    """False when module is already on device, spread over devices, or quantized."""
    if any(getattr(module, name, None) for name in _SELF_PLACED):
        return False
    found = _tensor_devices(module)
    return not (len(found) > 1 or found == {device})


def _call_factory(factory: Callable[..., Any], device: torch.device) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}   # type: ignore[assignment]
    if "device" in params:
        return factory(device=device)
    if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
           for p in params.values()):
        return factory(device)
    return factory()


def place(model: Any, device: torch.device) -> Any:
    """Move an nn.Module to device (unless it placed itself) and put it in eval mode."""
    if isinstance(model, torch.nn.Module):
        if _needs_move(model, device):
            model = model.to(device)
        model = model.eval()
    return model


class ModelPool:
    """One model per device slot, shared by the workers of that slot.

    Worker i (in the order their context factories run) gets slot
    ``i // workers_per_device``.  Given an ``nn.Module``: with one slot, that
    module is used (moved to the device); with several, every slot gets its
    own deep copy of it, made from host memory, so no device copies its
    model from another GPU and no two devices share one module object.  A
    factory runs once per slot, inside that device's CUDA context.
    """

    def __init__(self, factory: Any, devices: list[torch.device], workers_per_device: int) -> None:
        if isinstance(factory, torch.nn.Module) and len(devices) > 1:
            found = _tensor_devices(factory)
            if found - {torch.device("cpu")}:
                raise ValueError(
                    "invalid load_model value: with several devices, pass a module on the cpu "
                    "(each device gets a copy of it) or a factory "
                    f"(got a module on {', '.join(sorted(str(d) for d in found))})")
        self.factory = factory
        self.devices = devices
        self.workers_per_device = workers_per_device
        self._lock = threading.Lock()   # guards _next, _models, factory (the pool's state)
        self._next = 0
        self._models: dict[int, Any] = {}
        # one per slot: its first worker loads the model, the slot's other worker waits
        self._slot_locks = [threading.Lock() for _ in devices]
        self._copy_lock = threading.Lock()   # one deep copy of the template at a time

    def claim(self) -> tuple[torch.device, Any]:
        """Called once per worker thread: its device and that device's model.

        Raises:
            ValueError: a factory returned a module another device already has.
            RuntimeError: the pool was released (the function is closed).
        """
        with self._lock:
            slot = (self._next // self.workers_per_device) % len(self.devices)
            self._next += 1
        device = self.devices[slot]
        with self._slot_locks[slot]:
            with self._lock:
                model = self._models.get(slot)
                factory = self.factory
            if model is not None:
                return device, model
            if factory is None:
                raise RuntimeError("the model pool was released: the function is closed")
            model = self._load(factory, device)
            with self._lock:
                for other, m in self._models.items():
                    if m is model:
                        raise ValueError(
                            f"invalid load_model value: it returned the same object for "
                            f"{self.devices[other]} and {device}; return a new model per call")
                self._models[slot] = model
            return device, model

    def _load(self, factory: Any, device: torch.device) -> Any:
        with device_context(device):
            if isinstance(factory, torch.nn.Module):
                if len(self.devices) == 1:
                    model = factory
                else:
                    with self._copy_lock:
                        model = copy.deepcopy(factory)
            else:
                model = _call_factory(factory, device)
            model = place(model, device)
            if device.type == "cuda":
                # Work the loader queued (on any stream) is done before a worker's stream uses it.
                torch.cuda.synchronize(device)
        return model

    def release(self) -> None:
        """Drop every model and the factory, so a closed function holds no GPU memory."""
        with self._lock:
            self._models.clear()
            self.factory = None
        if any(d.type == "cuda" for d in self.devices) and torch.cuda.is_initialized():
            try:
                torch.cuda.empty_cache()
            except RuntimeError:   # a broken context (device-side assert) refuses; nothing to give back
                pass


class Replica:
    """A worker's view of its device: the model and, on CUDA, the worker's own stream."""

    def __init__(self, model: Any, device: torch.device, *, call: Callable[[Any, Any], Any],
                 autocast: torch.dtype | None) -> None:
        self.model = model
        self.device = device
        self.call = call
        self.autocast = autocast
        self.is_cuda = device.type == "cuda"
        self.pin = self.is_cuda
        self.cuda_stream = torch.cuda.Stream(device) if self.is_cuda else None

    def stream(self) -> Any:
        """Make this worker's device and stream current (a no-op on CPU)."""
        if self.cuda_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.cuda_stream)

    def to_device(self, batch: Any) -> Any:
        """Queue the copy of a collated (pinned) batch to the device; call inside :meth:`stream`.

        A :class:`Padded` batch's ``lengths`` stay on the CPU, where
        ``pack_padded_sequence`` wants them.
        """
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=self.pin)
        if isinstance(batch, Padded):
            return Padded(move(batch.values), move(batch.attention_mask), batch.lengths)
        return map_leaves(move, batch)

    def _autocast(self) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def forward(self, moved: Any) -> Any:
        """Run the model on a moved batch; call inside :meth:`stream`."""
        with torch.inference_mode(), self._autocast():
            return self.call(self.model, moved)

    def synchronize(self) -> None:
        """Wait until everything queued on this worker's stream is done (no-op on CPU)."""
        if self.cuda_stream is not None:
            self.cuda_stream.synchronize()
