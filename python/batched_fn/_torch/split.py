"""A model's batched output -> one output per caller: select fields, move, split, trim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch

from ..errors import BatchedFnError
from .tree import map_leaves

__all__ = ["split", "select_fields", "check_fields", "trim_rows"]

Move = Callable[[torch.Tensor], torch.Tensor]


def check_fields(fields: Any) -> Any:
    """Validate batched_model's ``fields`` argument: None, a name/index, or a sequence of them.

    Raises:
        TypeError: anything else.
    """
    def ok(f: Any) -> bool:
        return isinstance(f, str) or (isinstance(f, int) and not isinstance(f, bool))
    if fields is None or ok(fields):
        return fields
    if isinstance(fields, (tuple, list)) and fields and all(ok(f) for f in fields):
        return tuple(fields)
    raise TypeError(f"invalid fields value: expected a field name or index, or a non-empty "
                    f"list of them (got {fields!r})")


def _field(out: Any, name: Any) -> Any:
    try:
        return out[name]
    except (KeyError, IndexError, TypeError):
        have = list(out.keys()) if isinstance(out, Mapping) else (
            f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__)
        raise BatchedFnError(f"model output has no field {name!r} (it has {have})") from None


def select_fields(out: Any, fields: Any) -> Any:
    """Keep only the selected fields of a dict/ModelOutput/tuple output (before any copy).

    One name gives that field itself; a tuple of names gives a dict (of
    indices, a tuple).

    Raises:
        BatchedFnError: a field is missing.
    """
    if fields is None:
        return out
    if not isinstance(fields, tuple):
        return _field(out, fields)
    if isinstance(out, Mapping):
        return {f: _field(out, f) for f in fields}
    return tuple(_field(out, f) for f in fields)


def _is_row_list(out: Any, size: int) -> bool:
    # A list with one dict per input (torchvision detection): already per row.
    return isinstance(out, list) and len(out) == size and size > 0 and all(
        isinstance(v, Mapping) for v in out)


def _rows(out: Any, n: int, size: int, move: Move, where: str) -> list[Any]:
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != size:
            raise BatchedFnError(
                f"model {where} has shape {tuple(out.shape)!r}; expected dim 0 to be the batch size {size}")
        return list(move(out[:n]).unbind(0))
    if isinstance(out, Mapping):   # a dict, or a ModelOutput
        columns = {k: _rows(v, n, size, move, f"{where}[{k!r}]") for k, v in out.items()}
        return [{k: col[i] for k, col in columns.items()} for i in range(n)]
    if _is_row_list(out, size):
        return [map_leaves(move, row) for row in out[:n]]
    if isinstance(out, (tuple, list)):
        if len(out) == size and not any(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in out):
            return list(out[:n])   # one plain value per row (labels, strings)
        columns_seq = [_rows(v, n, size, move, f"{where}[{i}]") for i, v in enumerate(out)]
        if hasattr(out, "_fields"):
            return [type(out)(*row) for row in zip(*columns_seq)]
        return [type(out)(row) for row in zip(*columns_seq)]
    raise BatchedFnError(f"model {where} is a {type(out).__name__}; expected a tensor, a dict/tuple "
                         f"of tensors with the batch along dim 0, or a list of one dict per input")


def split(out: Any, n: int, size: int, to: torch.device | None = None, *, move: Move | None = None) -> list[Any]:
    """Return the first n rows of out, one per caller; out has size rows along dim 0.

    Tensors, dicts and tuples (nested) are split field by field; a list of
    ``size`` dicts is taken as one dict per input.  With to (a device), each
    tensor is copied there first; move (a function of a tensor) replaces
    that copy: one copy per tensor per batch either way.

    Raises:
        BatchedFnError: a tensor's dim 0 is not the batch size, or out is
            none of the above.
    """
    if move is None and to is not None:
        dev = to

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(dev, copy=True) if t.device != dev else t.clone()
    return _rows(out, n, size, move or (lambda t: t), "output")


def trim_rows(rows: list[Any], lengths: list[int], padded: int, fields: Sequence[Any] | None) -> list[Any]:
    """Cut each row's token-level tensors from the padded length back to its own length.

    Without fields: a row tensor is token-level when it has 2 dims or more
    and its first is the padded length ([L, H] hidden states, [L, V]
    logits); a pooled [H] output is never cut, whatever H is.  With fields
    (names of a dict row, or indices of a tuple row), exactly those fields
    are cut, whatever their number of dims.
    """
    def cut(t: Any, n: int, min_dim: int) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= min_dim and t.shape[0] == padded:
            return t[:n]
        return t

    out = []
    for row, n in zip(rows, lengths):
        if fields is None:
            out.append(map_leaves(lambda t, n=n: cut(t, n, 2), row))
        elif isinstance(row, dict):
            out.append({k: (map_leaves(lambda t, n=n: cut(t, n, 1), v) if k in fields else v)
                        for k, v in row.items()})
        elif isinstance(row, tuple):
            items = [map_leaves(lambda t, n=n: cut(t, n, 1), v) if i in fields else v
                     for i, v in enumerate(row)]
            out.append(type(row)(*items) if hasattr(row, "_fields") else tuple(items))
        else:
            out.append(row)
    return out
