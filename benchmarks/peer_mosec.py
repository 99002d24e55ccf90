"""mosec serving the toy model (benchmarks/peer_toy.py) at ``POST /embed``.

``{"text": "..."}`` -> ``{"embedding": [8 floats]}``; one worker process, dynamic
batching up to 32 inputs, 5 ms wait.  Run with build/venv-peers' python; the
flags are mosec's own (``--address 127.0.0.1 --port 8000``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mosec import Server, Worker

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer_toy, also in spawned workers

import peer_toy  # noqa: E402


class Embed(Worker):
    """Batches of decoded JSON bodies -> one response dict each (mosec's JSON (de)serialisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = peer_toy.Toy()

    def forward(self, data: list[Any]) -> list[dict[str, list[float]]]:
        """Embed a batch of ``{"text": ...}`` bodies."""
        vectors = self.model.embed([item["text"] for item in data])
        return [{"embedding": v} for v in vectors]

    def serialize(self, data: dict[str, list[float]]) -> bytes:
        """Compact JSON, as the example server writes it (mosec's default indents)."""
        return json.dumps(data).encode()


if __name__ == "__main__":
    server = Server()
    server.append_worker(Embed, num=1, max_batch_size=peer_toy.MAX_BATCH_SIZE,
                         max_wait_time=round(peer_toy.MAX_DELAY_S * 1000), route="/embed")
    server.run()
