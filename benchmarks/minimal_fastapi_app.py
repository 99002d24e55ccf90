"""The reference for the example server's speed: a minimal FastAPI app over the same batcher.

It is what a user would write in ten lines: read the JSON body, ``await
fn.acall(text)``, return a dict.  No validation, limits, metrics or shutdown
handling.  ``benchmarks/server_speed.py`` runs it next to the example server
with the same toy model and knobs::

    python benchmarks/minimal_fastapi_app.py --port 8001 --toy-batch-ms 2 --toy-item-ms 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import socket
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request

from batched_fn import batched_fn
from batched_fn.examples.models import ToyEmbedder
from batched_fn.examples.ready import ready_line


def create_app(args: argparse.Namespace) -> FastAPI:
    """The whole app: one route over one batched_fn."""
    fn = batched_fn(lambda texts, model: model.embed(texts), max_batch_size=args.max_batch_size,
                    max_delay=args.max_delay, channel_cap=256,
                    context={"model": lambda: ToyEmbedder(dim=args.toy_dim, batch_ms=args.toy_batch_ms,
                                                           item_ms=args.toy_item_ms)})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fn.start()
        print(ready_line("minimal app", f"http://127.0.0.1:{app.state.port}"), flush=True)
        yield
        fn.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/embed")
    async def embed(request: Request) -> Any:
        body = await request.json()
        return {"embedding": await fn.acall(body["text"])}

    return app


def main() -> None:
    """Serve on 127.0.0.1 and print the ready line the benchmark waits for."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay", type=float, default=0.005)
    parser.add_argument("--toy-dim", type=int, default=32)
    parser.add_argument("--toy-batch-ms", type=float, default=2.0)
    parser.add_argument("--toy-item-ms", type=float, default=0.05)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    app = create_app(args)
    app.state.port = sock.getsockname()[1]
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
