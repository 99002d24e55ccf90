"""batched_fn for torch models: ``predict = batched_model(load_model, device="cuda")``.

Optional: needs ``pip install 'batched_fn[torch]'``.  torch is imported when a
model is built (or a name other than :func:`batched_model` is used), never by
``import batched_fn``.
"""

from __future__ import annotations

from typing import Any

from ._torch.lengths import sequence_length
from ._torch.model import BatchedModel, batched_model

__all__ = ["batched_model", "BatchedModel", "TensorSpec", "Padded", "collate", "split", "sequence_length"]

_LAZY = {"TensorSpec": "spec", "Padded": "collate", "collate": "collate", "split": "split"}


def __getattr__(name: str) -> Any:
    # The rest of the layer imports torch: load it on first use only.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batched_fn.torch' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"batched_fn._torch.{module}"), name)
