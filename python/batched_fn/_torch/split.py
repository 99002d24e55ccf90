"""Split a model's batched output back into one output per caller."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import BatchedFnError

__all__ = ["split"]


def _rows(out: Any, n: int, size: int, to: torch.device | None, where: str) -> list[Any]:
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != size:
            raise BatchedFnError(
                f"model {where} has shape {tuple(out.shape)!r}; expected dim 0 to be the batch size {size}")
        out = out[:n]
        if to is not None:
            # One copy per batch, made outside inference_mode: callers get
            # ordinary tensors they may modify, not inference tensors.
            out = out.to(to, copy=True) if out.device != to else out.clone()
        return list(out.unbind(0))
    if isinstance(out, Mapping):   # a dict, or a ModelOutput
        columns = {k: _rows(v, n, size, to, f"{where}[{k!r}]") for k, v in out.items()}
        return [{k: col[i] for k, col in columns.items()} for i in range(n)]
    if isinstance(out, (tuple, list)):
        if len(out) == size and not any(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in out):
            return list(out[:n])   # one plain value per row (labels, strings)
        columns_seq = [_rows(v, n, size, to, f"{where}[{i}]") for i, v in enumerate(out)]
        if hasattr(out, "_fields"):
            return [type(out)(*row) for row in zip(*columns_seq)]
        return [type(out)(row) for row in zip(*columns_seq)]
    raise BatchedFnError(f"model {where} is a {type(out).__name__}; expected a tensor, "
                         f"or a dict/tuple of tensors with the batch along dim 0")


def split(out: Any, n: int, size: int, to: torch.device | None) -> list[Any]:
    """Return the first n rows of out, one per caller; out has size rows along dim 0.

    Tensors, dicts and tuples (nested) are split field by field.  With to
    (a device), the rows are copied there first, in one copy per tensor.

    Raises:
        BatchedFnError: a tensor's dim 0 is not the batch size, or out is
            not a tensor/dict/tuple.
    """
    return _rows(out, n, size, to, "output")
