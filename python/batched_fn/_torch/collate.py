"""Collation: many inputs of one spec -> one batch, written straight into pinned memory.

Same-shape tensors are stacked; tensors whose dims vary (a spec dim of None)
are padded to the longest in the batch with ``pad_value``, and the lengths of
their first dim become an attention mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .spec import TensorSpec

__all__ = ["Padded", "collate", "next_allowed_size"]

#: the field a padded dict gets its mask under, unless it has one already
MASK_KEY = "attention_mask"


class Padded(NamedTuple):
    """A batch of variable-length tensors padded to the longest.

    ``values``: (batch, max_len, ...); ``attention_mask``: (batch, max_len)
    int64, 1 on real positions, 0 on padding; ``lengths``: (batch,) int64.
    The default call runs ``model(values, attention_mask)``.
    """

    values: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor


def next_allowed_size(n: int, allowed: tuple[int, ...] | None) -> int:
    """The smallest allowed batch size >= n (n itself when allowed is None)."""
    if allowed is None:
        return n
    for size in allowed:
        if size >= n:
            return size
    raise ValueError(f"batch of {n} exceeds the largest allowed batch size {allowed[-1]}")


def _stack_leaf(tensors: list[torch.Tensor], spec: TensorSpec, pad_value: float,
                pin: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (or pad) one field; also return the first-dim lengths when padded."""
    first = tensors[0]
    dtype = first.dtype if spec.dtype is None else spec.dtype
    shapes = [tuple(t.shape) for t in tensors]
    if all(s == shapes[0] for s in shapes):
        out = torch.empty((len(tensors),) + shapes[0], dtype=dtype, pin_memory=pin)
        torch.stack([t.to(dtype) for t in tensors], out=out)
    else:
        longest = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
        out = torch.full((len(tensors),) + longest, pad_value, dtype=dtype, pin_memory=pin)
        for i, t in enumerate(tensors):
            out[(i,) + tuple(slice(0, n) for n in t.shape)].copy_(t)
    if not spec.shape or spec.shape[0] is not None:
        return out, None
    lengths = torch.tensor([s[0] for s in shapes], dtype=torch.int64)
    return out, (lengths.pin_memory() if pin else lengths)


def _mask(lengths: torch.Tensor, max_len: int, pin: bool) -> torch.Tensor:
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    return mask.pin_memory() if pin else mask


def _pad_value_for(pad_value: Any, key: Any) -> float:
    if isinstance(pad_value, dict):
        return pad_value.get(key, 0)
    return 0 if key == MASK_KEY else pad_value


def _collate(examples: list[Any], spec: Any, pad_value: Any, pin: bool, key: Any,
             top: bool) -> tuple[Any, torch.Tensor | None]:
    if isinstance(spec, TensorSpec):
        out, lengths = _stack_leaf(examples, spec, _pad_value_for(pad_value, key), pin)
        if lengths is not None and top:
            return Padded(out, _mask(lengths, out.shape[1], pin), lengths), lengths
        return out, lengths
    if isinstance(spec, dict):
        batch: dict[Any, Any] = {}
        first_lengths = None
        for k, sub in spec.items():
            batch[k], lengths = _collate([ex[k] for ex in examples], sub, pad_value, pin, k, False)
            if first_lengths is None and lengths is not None:
                first_lengths = lengths
                first_len = batch[k].shape[1]
        if first_lengths is not None and MASK_KEY not in batch:
            batch[MASK_KEY] = _mask(first_lengths, first_len, pin)
        return batch, None
    items = [_collate([ex[i] for ex in examples], sub, pad_value, pin, i, False)[0]
             for i, sub in enumerate(spec)]
    return (items if isinstance(spec, list) else tuple(items)), None


def collate(examples: list[Any], spec: Any, *, pad_value: Any = 0, size: int | None = None,
            pin: bool = False) -> Any:
    """Collate checked inputs (all fitting spec) into one batch of ``size`` rows.

    Rows past ``len(examples)`` repeat the last input (padding up to an
    allowed batch size); their outputs are dropped later.  A bare tensor
    whose length varies gives a :class:`Padded`; a dict whose fields vary in
    length gets an ``attention_mask`` field unless it has one.  With pin, the
    batch is written into page-locked memory (for a non-blocking copy).
    """
    n = len(examples)
    if size is not None and size > n:
        examples = examples + [examples[-1]] * (size - n)
    batch, _ = _collate(examples, spec, pad_value, pin, None, True)
    return batch
