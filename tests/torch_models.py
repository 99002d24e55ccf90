"""Small torch models the torch-layer tests share (import only after ``pytest.importorskip("torch")``)."""

from __future__ import annotations

import torch


class MaskedMean(torch.nn.Module):
    """Mean of token embeddings over the real (unmasked) positions; records each batch's mask."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(100, 8)
        self.masks: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.masks.append(attention_mask.clone())
        e = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return e.sum(1) / attention_mask.sum(1, keepdim=True)

    def one(self, ids: torch.Tensor) -> torch.Tensor:
        """The unbatched answer for one sequence of ids."""
        return self.emb(ids).mean(0)
