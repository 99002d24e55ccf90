"""A closed-loop HTTP load generator for the example server (asyncio streams, keep-alive).

``concurrency`` clients each hold one connection and send the next request as
soon as the previous answer arrived, until ``requests`` were sent or
``duration`` seconds passed.  It speaks just enough HTTP/1.1 (Content-Length
bodies) to stay cheap next to the server on a small machine::

    python -m batched_fn.examples.loadgen http://127.0.0.1:8000 --concurrency 1,8,32 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

__all__ = ["LoadResult", "run_load", "sample_texts", "main"]

_WORDS = ("batch model queue server latency vector token request answer sentence "
          "quick brown fox lazy dog river mountain coffee morning network signal "
          "python thread worker embedding search index cluster memory").split()


def sample_texts(n: int = 512, seed: int = 0) -> list[str]:
    """n short English-like sentences of 6 to 16 words, the same for a given seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


@dataclass
class LoadResult:
    """What one load run measured; latencies (seconds) are those of 200 answers."""

    concurrency: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    transport_errors: int = 0

    @property
    def ok(self) -> int:
        """Answers with status 200."""
        return self.statuses.get(200, 0)

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The q-quantile (0..1) of the successful latencies, in seconds (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                   body: bytes) -> tuple[int, bytes, bool]:
    """Send one POST on a kept-alive connection; return (status, body, server keeps it open)."""
    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    header = await reader.readuntil(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, keep = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    return status, await reader.readexactly(length), keep


async def _client(host: str, port: int, path: str, texts: Sequence[str], result: LoadResult,
                  next_index: list[int], limit: int | None, stop_at: float) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: ").encode()
    reader = writer = None
    try:
        while time.perf_counter() < stop_at:
            i = next_index[0]
            if limit is not None and i >= limit:
                return
            next_index[0] = i + 1
            body = json.dumps({"text": texts[i % len(texts)]}).encode()
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            start = time.perf_counter()
            try:
                status, _, keep = await _request(reader, writer, head, body)  # type: ignore[arg-type]
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.transport_errors += 1
                writer.close()
                reader = writer = None
                continue
            if status == 200:
                result.latencies.append(time.perf_counter() - start)
            result.statuses[status] += 1
            if not keep:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def run_load(url: str, concurrency: int, *, requests: int | None = None, duration: float | None = None,
                   texts: Sequence[str] | None = None) -> LoadResult:
    """Drive url (``http://host:port/embed``) with concurrency closed-loop clients.

    Stops after requests sent or duration seconds, whichever comes first; at
    least one of them must be given.
    """
    if concurrency < 1:
        raise ValueError(f"invalid concurrency value: expected an int >= 1 (got {concurrency!r})")
    if requests is None and duration is None:
        raise ValueError("run_load needs requests= or duration= (got neither)")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/embed"
    texts = list(texts) if texts is not None else sample_texts()
    result = LoadResult(concurrency=concurrency, elapsed=0.0)
    start = time.perf_counter()
    stop_at = start + duration if duration is not None else float("inf")
    next_index = [0]
    await asyncio.gather(*(_client(host, port, path, texts, result, next_index, requests, stop_at)
                           for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_load_sync(url: str, concurrency: int, **kwargs: object) -> LoadResult:
    """run_load on a fresh event loop (uvloop when installed)."""
    loop = _new_loop()
    try:
        return loop.run_until_complete(run_load(url, concurrency, **kwargs))  # type: ignore[arg-type]
    finally:
        loop.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print requests/s and p50/p99 for each concurrency."""
    parser = argparse.ArgumentParser(prog="python -m batched_fn.examples.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency level")
    parser.add_argument("--requests", type=int, default=None, help="stop each level after this many requests")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/") + "/embed"
    print(f"{'conc':>5} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}  statuses")
    for level in (int(c) for c in args.concurrency.split(",")):
        r = run_load_sync(url, level, duration=args.duration, requests=args.requests)
        print(f"{level:>5} {r.rps:>9.1f} {r.percentile(0.5) * 1e3:>9.2f} {r.percentile(0.99) * 1e3:>9.2f}  "
              f"{dict(r.statuses)} transport_errors={r.transport_errors}")


if __name__ == "__main__":
    main()
