"""The toy model the server peers serve: the same work as the example server's ``--model toy``.

It mirrors ``batched_fn.examples.models.ToyEmbedder`` (same table from the same
seed, so the same vector for the same text), because the peers run in their own
venv (build/venv-peers) without batched_fn: bytes -> fixed random table -> masked
mean, then a sleep of ``batch_ms + item_ms * len(texts)`` milliseconds.
"""

from __future__ import annotations

import time

import numpy as np

#: the cost and size every server in bench_servers.py is started with
DIM = 8
BATCH_MS = 2.0
ITEM_MS = 0.05
MAX_BATCH_SIZE = 32
MAX_DELAY_S = 0.005


class Toy:
    """A batch of texts -> one ``DIM``-float vector each, costing ``BATCH_MS + ITEM_MS`` per item."""

    def __init__(self, dim: int = DIM, batch_ms: float = BATCH_MS, item_ms: float = ITEM_MS, seed: int = 0) -> None:
        self.dim = dim
        self.batch_ms = batch_ms
        self.item_ms = item_ms
        self.table = np.random.default_rng(seed).standard_normal((256, dim)).astype(np.float64)

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        encoded = [t.encode("utf-8") for t in texts]
        width = max(1, max(len(b) for b in encoded))
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.float64)
        for row, data in enumerate(encoded):
            ids[row, :len(data)] = np.frombuffer(data, dtype=np.uint8)
            mask[row, :len(data)] = 1.0
        summed = np.einsum("bw,bwd->bd", mask, self.table[ids])
        out = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        time.sleep((self.batch_ms + self.item_ms * len(texts)) / 1000.0)
        return out.tolist()
