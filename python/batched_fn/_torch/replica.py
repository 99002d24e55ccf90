"""One model replica on one device: load it, move a batch there, run it.

Running a batch is split in two steps so they can overlap across workers:
``prepare`` (collate into pinned memory, start the host-to-device copy on
this worker's copy stream, record an event) and ``run`` (make the compute
stream wait for that event, run the model under inference_mode).  On CPU
the same two steps run with no streams.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from typing import Any, Callable

import torch

from .collate import Padded
from .tree import leaves, map_leaves

__all__ = ["Replica", "ModelPool", "default_call"]


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


def _load(factory: Any, device: torch.device, first: bool) -> Any:
    """Build one replica on device from a module or a factory."""
    if isinstance(factory, torch.nn.Module):
        model = factory if first else copy.deepcopy(factory)
    else:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "device" in params:
            model = factory(device=device)
        elif any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                 for p in params.values()):
            model = factory(device)
        else:
            model = factory()
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    return model


class ModelPool:
    """Loads one model per device, shared by the workers of that device.

    Worker i (in the order their context factories run) gets devices[i //
    workers_per_device]; the first of them loads the model, in its own
    thread, and the others of that device reuse it.
    """

    def __init__(self, factory: Any, devices: list[torch.device], workers_per_device: int) -> None:
        self.factory = factory
        self.devices = devices
        self.workers_per_device = workers_per_device
        self._lock = threading.Lock()
        self._next = 0
        self._models: dict[int, Any] = {}
        self._device_locks = [threading.Lock() for _ in devices]

    def claim(self) -> tuple[torch.device, Any]:
        """Called once per worker thread: its device and that device's model."""
        with self._lock:
            slot = (self._next // self.workers_per_device) % len(self.devices)
            self._next += 1
        with self._device_locks[slot]:
            if slot not in self._models:
                self._models[slot] = _load(self.factory, self.devices[slot], first=not self._models)
            return self.devices[slot], self._models[slot]


class Replica:
    """A worker's view of its device: the model, and on CUDA its own two streams."""

    def __init__(self, model: Any, device: torch.device, *, call: Callable[[Any, Any], Any],
                 autocast: torch.dtype | None, pin: bool, side_stream: bool) -> None:
        self.model = model
        self.device = device
        self.call = call
        self.autocast = autocast
        self.pin = pin
        self.is_cuda = device.type == "cuda"
        if self.is_cuda:
            # Each worker its own compute stream, so one worker's wait for its
            # output never waits on another worker's batch; with side_stream,
            # the input copy runs on a second stream and overlaps compute.
            self.compute_stream = torch.cuda.Stream(device)
            self.copy_stream = torch.cuda.Stream(device) if side_stream else self.compute_stream
        else:
            self.compute_stream = self.copy_stream = None

    def prepare(self, batch: Any) -> tuple[Any, Any]:
        """Start moving a collated (pinned) batch to the device; return (batch, event)."""
        if not self.is_cuda:
            moved = map_leaves(lambda t: t.to(self.device), batch)
            return moved, None
        with torch.cuda.stream(self.copy_stream):
            moved = map_leaves(lambda t: t.to(self.device, non_blocking=self.pin), batch)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return moved, event

    def _autocast(self) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def stream(self) -> Any:
        """Make the compute stream current (a no-op on CPU)."""
        if not self.is_cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.compute_stream)

    def run(self, moved: Any, event: Any) -> Any:
        """Run the model on a prepared batch; call inside :meth:`stream`."""
        if event is not None and self.copy_stream is not self.compute_stream:
            self.compute_stream.wait_event(event)
            # The inputs were allocated on the copy stream: tell the caching
            # allocator they are in use on the compute stream too.
            for t in leaves(moved):
                t.record_stream(self.compute_stream)
        with torch.inference_mode(), self._autocast():
            return self.call(self.model, moved)
