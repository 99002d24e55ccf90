"""Inputs as trees: a tensor, or a dict/tuple/list of trees (a tokenizer's output).

Numpy arrays become tensors here, so the rest of the layer sees torch only.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["to_tensors", "to_host", "map_leaves", "leaves", "describe"]


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    # from_numpy shares memory; it warns on read-only arrays and rejects
    # non-native byte order and negative strides (img[..., ::-1]), so those
    # are copied first.
    if (not arr.flags.writeable or not arr.dtype.isnative
            or any(s < 0 for s in arr.strides)):
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C")
    return torch.from_numpy(arr)


def to_tensors(example: Any, where: str = "input") -> Any:
    """Return example with numpy arrays turned into tensors.

    Raises:
        TypeError: a leaf is neither a tensor nor a numpy array (names where).
    """
    if isinstance(example, torch.Tensor):
        return example
    if isinstance(example, np.ndarray):
        if example.dtype == object:
            raise TypeError(f"invalid {where}: expected a numeric array (got dtype {example.dtype!r})")
        return _array_to_tensor(example)
    if isinstance(example, dict):
        return {k: to_tensors(v, f"{where}[{k!r}]") for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(to_tensors(v, f"{where}[{i}]") for i, v in enumerate(example))
    # Mappings such as a tokenizer's BatchEncoding are dicts in all but type.
    if hasattr(example, "keys") and hasattr(example, "__getitem__"):
        return {k: to_tensors(example[k], f"{where}[{k!r}]") for k in example.keys()}
    raise TypeError(
        f"invalid {where}: expected a tensor, a numpy array, or a dict/tuple of them "
        f"(got {type(example).__name__})")


def to_host(example: Any) -> Any:
    """Return example with every tensor detached and on the CPU, ready to collate.

    A tensor that requires grad is detached (the batch is built with
    ``out=``, which autograd refuses); one on another device (a GPU) is
    copied to the CPU.  A tensor that cannot be copied (the meta device)
    raises, failing only its own input.
    """
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t if t.device.type == "cpu" else t.to("cpu")
    return map_leaves(one, example)


def map_leaves(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply fn to every tensor of tree, keeping its structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_leaves(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):   # a NamedTuple
        return type(tree)(*(map_leaves(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_leaves(fn, v) for v in tree)
    return tree


def leaves(tree: Any) -> list[torch.Tensor]:
    """Every tensor of tree, depth first."""
    out: list[torch.Tensor] = []
    map_leaves(out.append, tree)
    return out


def describe(shape: tuple[int | None, ...]) -> str:
    """A shape as users write it: (1024,), (None, 16)."""
    return repr(tuple(shape))
