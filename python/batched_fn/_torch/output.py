"""Outputs handed to callers: their own memory, complete before they see them.

The rules (README, "Torch models"): every output tensor a caller gets was
written by this batch alone (never a buffer a later batch reuses); it is
complete when the call returns, whatever stream the caller reads it on,
because the worker waits for its stream once after queueing every copy; and
a CUDA output is recorded on its device's default stream, so memory freed by
a caller is not reused before the caller's default-stream work on it ran.
"""

from __future__ import annotations

from typing import Any

import torch

from .replica import Replica
from .tree import leaves, map_leaves

__all__ = ["mover", "own_rows", "make_ready"]


def mover(out_dev: torch.device | None) -> Any:
    """The per-tensor copy of a batch output to out_dev, or None to keep it in place.

    CUDA -> CPU copies go into fresh pinned memory, non-blocking: the worker
    waits once for all of them (:func:`make_ready`), not once per tensor.
    """
    if out_dev is None:
        return None

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == out_dev:
            return t.clone()   # outside inference_mode: an ordinary tensor of its own
        if out_dev.type == "cpu" and t.device.type == "cuda":
            dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            dst.copy_(t, non_blocking=True)
            return dst
        return t.to(out_dev, copy=True, non_blocking=t.device.type == "cuda")
    return move


def own_rows(rows: list[Any]) -> list[Any]:
    """Clone every tensor of every row (output_device=None).

    A row is then its caller's own memory: it does not keep the rest of the
    batch's output (other rows, other fields) alive, and it is an ordinary
    tensor, not an inference tensor.
    """
    return [map_leaves(lambda t: t.clone(), row) for row in rows]


def make_ready(rows: list[Any], replica: Replica) -> None:
    """Wait for the worker's stream, then record each CUDA output on its default stream."""
    replica.synchronize()
    if replica.is_cuda:
        for t in leaves(rows):
            if t.device.type == "cuda":
                t.record_stream(torch.cuda.default_stream(t.device))
