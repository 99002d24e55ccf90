"""What an input must look like, and the check that fails one bad input alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .tree import describe

__all__ = ["TensorSpec", "normalize_spec", "infer_spec", "check", "example_of"]


@dataclass(frozen=True)
class TensorSpec:
    """The expected shape (without the batch dim) and dtype of one input tensor.

    ``None`` in shape marks a dimension that may vary between inputs (it is
    padded to the longest in the batch); ``dtype=None`` accepts any dtype
    (a batch still needs one dtype per field, the first input's wins).
    """

    shape: tuple[int | None, ...]
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        for d in shape:
            if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
                raise ValueError(f"invalid TensorSpec shape: expected ints >= 0 or None (got {self.shape!r})")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"invalid TensorSpec dtype: expected a torch.dtype or None (got {self.dtype!r})")
        object.__setattr__(self, "shape", shape)

    def __str__(self) -> str:
        dtype = "" if self.dtype is None else f" and dtype {self.dtype}"
        return f"shape {describe(self.shape)}{dtype}"


def normalize_spec(spec: Any) -> Any:
    """Turn a user's input_spec into a tree of TensorSpec.

    Accepts a TensorSpec, a shape tuple (ints/None), or a dict/tuple/list of those.

    Raises:
        TypeError: anything else.
    """
    if isinstance(spec, TensorSpec):
        return spec
    if isinstance(spec, (tuple, list)) and all(d is None or isinstance(d, int) for d in spec):
        return TensorSpec(tuple(spec))
    if isinstance(spec, dict):
        return {k: normalize_spec(v) for k, v in spec.items()}
    if isinstance(spec, (tuple, list)):
        return type(spec)(normalize_spec(v) for v in spec)
    raise TypeError(f"invalid input_spec value: expected a TensorSpec, a shape tuple, "
                    f"or a dict/tuple of them (got {spec!r})")


def _signature(example: Any) -> Any:
    """A hashable summary of an input's structure, dtypes and shapes."""
    if isinstance(example, torch.Tensor):
        return ("t", example.dtype, tuple(example.shape))
    if isinstance(example, dict):
        return ("d", tuple(sorted((k, _signature(v)) for k, v in example.items())))
    return ("s", type(example).__name__, tuple(_signature(v) for v in example))


def _spec_of(sig: Any, pad: bool) -> Any:
    kind = sig[0]
    if kind == "t":
        shape = sig[2]
        if pad and shape:
            shape = (None,) + shape[1:]
        return TensorSpec(shape, sig[1])
    if kind == "d":
        return {k: _spec_of(v, pad) for k, v in sig[1]}
    children = [_spec_of(v, pad) for v in sig[2]]
    return children if sig[1] == "list" else tuple(children)


def infer_spec(examples: list[Any], pad: bool) -> Any:
    """The spec most inputs of a batch agree on (ties: the earliest).

    With pad, the first dim of every tensor may vary (a sequence length).
    """
    sigs = []
    for ex in examples:
        if pad:
            ex_sig = _signature(_zero_first_dims(ex))
        else:
            ex_sig = _signature(ex)
        sigs.append(ex_sig)
    counts = Counter(sigs)
    best = max(counts.values())
    first = next(s for s in sigs if counts[s] == best)
    return _spec_of(first, pad)


def _zero_first_dims(example: Any) -> Any:
    # Inputs that differ only in their first dims have the same padded spec:
    # compare them with those dims blanked out.
    if isinstance(example, torch.Tensor):
        return example.new_empty((0,) + tuple(example.shape[1:])) if example.dim() else example
    if isinstance(example, dict):
        return {k: _zero_first_dims(v) for k, v in example.items()}
    return type(example)(_zero_first_dims(v) for v in example)


def check(example: Any, spec: Any, where: str = "input") -> None:
    """Raise if example does not fit spec; the message names the field and both shapes.

    Raises:
        ValueError: wrong shape or wrong keys/length.
        TypeError: wrong dtype or wrong kind of value.
    """
    if isinstance(spec, TensorSpec):
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"invalid {where}: expected a tensor of {spec} (got {type(example).__name__})")
        shape = tuple(example.shape)
        if len(shape) != len(spec.shape) or any(
                want is not None and want != got for want, got in zip(spec.shape, shape)):
            raise ValueError(f"invalid {where}: expected {spec} (got shape {describe(shape)})")
        if spec.dtype is not None and example.dtype != spec.dtype:
            raise TypeError(f"invalid {where}: expected {spec} (got dtype {example.dtype})")
        return
    if isinstance(spec, dict):
        if not isinstance(example, dict):
            raise TypeError(f"invalid {where}: expected a dict with keys {sorted(spec)!r} "
                            f"(got {type(example).__name__})")
        if set(example) != set(spec):
            raise ValueError(f"invalid {where}: expected keys {sorted(spec)!r} (got {sorted(example)!r})")
        for k, sub in spec.items():
            check(example[k], sub, f"{where}[{k!r}]")
        return
    if not isinstance(example, (tuple, list)):
        raise TypeError(f"invalid {where}: expected a tuple of {len(spec)} tensors "
                        f"(got {type(example).__name__})")
    if len(example) != len(spec):
        raise ValueError(f"invalid {where}: expected {len(spec)} items (got {len(example)})")
    for i, (item, sub) in enumerate(zip(example, spec)):
        check(item, sub, f"{where}[{i}]")


def example_of(spec: Any) -> Any:
    """An input of ones fitting spec (a varying dim gets length 1), or None if a dtype is unset.

    Used to warm a model up at start when ``input_spec`` says everything.
    """
    if isinstance(spec, TensorSpec):
        if spec.dtype is None:
            return None
        return torch.ones(tuple(1 if d is None else d for d in spec.shape), dtype=spec.dtype)
    items = list(spec.values()) if isinstance(spec, dict) else list(spec)
    made = [example_of(v) for v in items]
    if any(m is None for m in made):
        return None
    if isinstance(spec, dict):
        return dict(zip(spec.keys(), made))
    return type(spec)(made)
