"""LitServe serving the toy model (benchmarks/peer_toy.py) at ``POST /embed``.

``{"text": "..."}`` -> ``{"embedding": [8 floats]}``; one inference worker on CPU,
batching up to 32 inputs with a 5 ms batch timeout, LitServe's defaults otherwise
(one API server process).  Run with build/venv-peers' python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_toy  # noqa: E402


class EmbedAPI(ls.LitAPI):
    """decode -> batch of texts -> predict -> unbatch -> encode, LitServe's pipeline."""

    def setup(self, device: str) -> None:
        """Build the model in the inference worker."""
        self.model = peer_toy.Toy()

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe reads the JSON body
        """The text of a ``{"text": ...}`` body."""
        return request["text"]

    def predict(self, texts: list[str]) -> list[list[float]]:
        """Embed one batch."""
        return self.model.embed(list(texts))

    def encode_response(self, output: list[float]) -> dict[str, list[float]]:
        """``{"embedding": [...]}``, the example server's shape."""
        return {"embedding": output}


def main() -> None:
    """Serve on --host/--port until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = EmbedAPI(max_batch_size=peer_toy.MAX_BATCH_SIZE, batch_timeout=peer_toy.MAX_DELAY_S, api_path="/embed")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
