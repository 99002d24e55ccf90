"""The length of one example, for length buckets: ``length_buckets(sequence_length)``.

Imports nothing from torch: it reads ``shape`` and ``sum()``, so it runs in a
caller's process (a connected HTTP worker) as cheaply as in the model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["sequence_length"]

#: the fields of a tokenizer's output, most telling first
_MASK_FIELD = "attention_mask"
_IDS_FIELD = "input_ids"


def sequence_length(example: Any) -> int:
    """Tokens in one example: what a padded batch pads it from.

    A tensor, array or list: its first dim (``len``).  A mapping (a
    tokenizer's output for one text): the number of ones in its
    ``attention_mask`` if it has one, else the first dim of ``input_ids``,
    else of its first field.  A tuple: its first element's.

    Raises:
        TypeError: the example has no length.
    """
    if isinstance(example, Mapping):
        mask = example.get(_MASK_FIELD)
        if mask is not None:
            return int(mask.sum()) if hasattr(mask, "sum") else int(sum(mask))
        field = example.get(_IDS_FIELD)
        if field is None:
            if not example:
                raise TypeError("sequence_length: an empty mapping has no length")
            field = next(iter(example.values()))
        return sequence_length(field)
    if isinstance(example, tuple) and example:
        return sequence_length(example[0])
    shape = getattr(example, "shape", None)
    if shape is not None:
        if len(shape) == 0:
            raise TypeError(f"sequence_length: a 0-dim {type(example).__name__} has no length")
        return int(shape[0])
    try:
        return len(example)
    except TypeError:
        raise TypeError(f"sequence_length: an example of type {type(example).__name__} has no length") from None
