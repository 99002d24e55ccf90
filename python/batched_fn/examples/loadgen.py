"""An HTTP load generator for the example server (asyncio streams, keep-alive).

Closed loop (``--concurrency``): each client holds one connection and sends
the next request as soon as the previous answer arrived.  Open loop
(``--rate``): requests are sent at Poisson arrival times of the given mean
rate whatever the answers do, each on an idle kept-alive connection (a new
one if none is idle), and latency counts from the *scheduled* send time, so
a server falling behind shows as growing latency instead of a slower
sender.  Both stop after ``requests`` were sent or ``duration`` seconds.  It
speaks just enough HTTP/1.1 (Content-Length bodies) to stay cheap next to
the server on a small machine::

    python -m batched_fn.examples.loadgen http://127.0.0.1:8000 --concurrency 1,8,32 --duration 5
    python -m batched_fn.examples.loadgen http://127.0.0.1:8000 --rate 50,200 --duration 5
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

__all__ = ["LoadResult", "run_load", "run_open_load", "run_load_sync", "run_open_load_sync", "sample_texts", "main"]

#: the most connections an open-loop run opens; further requests wait for one
MAX_OPEN_CONNECTIONS = 512

_WORDS = ("batch model queue server latency vector token request answer sentence "
          "quick brown fox lazy dog river mountain coffee morning network signal "
          "python thread worker embedding search index cluster memory").split()


def sample_texts(n: int = 512, seed: int = 0) -> list[str]:
    """n short English-like sentences of 6 to 16 words, the same for a given seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


@dataclass
class LoadResult:
    """What one load run measured; latencies (seconds) are those of 200 answers.

    concurrency: closed-loop clients (0 for an open-loop run); rate: the
    open-loop mean arrival rate asked for, requests/s (0 for closed loop).
    """

    concurrency: int
    elapsed: float
    rate: float = 0.0
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


class _Pool:
    """Idle kept-alive connections of an open-loop run, opened on demand up to a bound."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.freed = asyncio.Event()

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while True:
            if self.idle:
                return self.idle.pop()
            if self.opened < self.limit:
                self.opened += 1
                try:
                    return await asyncio.open_connection(self.host, self.port)
                except OSError:
                    self.opened -= 1
                    raise
            self.freed.clear()
            await self.freed.wait()

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        """Give a connection back (None: it was closed)."""
        if conn is None:
            self.opened -= 1
        else:
            self.idle.append(conn)
        self.freed.set()

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle = []


async def _open_one(pool: _Pool, head: bytes, body: bytes, scheduled: float, result: LoadResult) -> None:
    conn = None
    try:
        conn = await pool.get()
        status, _, keep = await _request(conn[0], conn[1], head, body)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        result.transport_errors += 1
        if conn is not None:
            conn[1].close()
        pool.put(None)
        return
    if status == 200:
        result.latencies.append(time.perf_counter() - scheduled)
    result.statuses[status] += 1
    if keep:
        pool.put(conn)
    else:
        conn[1].close()
        pool.put(None)


async def run_open_load(url: str, rate: float, *, requests: int | None = None, duration: float | None = None,
                        texts: Sequence[str] | None = None, seed: int = 0,
                        max_connections: int = MAX_OPEN_CONNECTIONS) -> LoadResult:
    """Drive url with Poisson arrivals of mean rate requests/s (open loop).

    Latency is measured from each request's scheduled send time.  Stops
    sending after requests sent or duration seconds (at least one must be
    given), then waits for the answers still due.
    """
    if not (rate > 0 and rate < float("inf")):
        raise ValueError(f"invalid rate value: expected requests/s > 0 (got {rate!r})")
    if requests is None and duration is None:
        raise ValueError("run_open_load needs requests= or duration= (got neither)")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (f"POST {parts.path or '/embed'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: ").encode()
    texts = list(texts) if texts is not None else sample_texts()
    rng = random.Random(seed)
    result = LoadResult(concurrency=0, elapsed=0.0, rate=rate)
    pool = _Pool(host, port, max_connections)
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    stop_at = start + duration if duration is not None else float("inf")
    scheduled = start
    try:
        while scheduled < stop_at and (requests is None or len(tasks) < requests):
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps({"text": texts[len(tasks) % len(texts)]}).encode()
            tasks.append(asyncio.ensure_future(_open_one(pool, head, body, scheduled, result)))
            scheduled += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    finally:
        pool.close()
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


def run_open_load_sync(url: str, rate: float, **kwargs: object) -> LoadResult:
    """run_open_load on a fresh event loop (uvloop when installed)."""
    loop = _new_loop()
    try:
        return loop.run_until_complete(run_open_load(url, rate, **kwargs))  # type: ignore[arg-type]
    finally:
        loop.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print requests/s and p50/p99 for each concurrency (or open-loop rate)."""
    parser = argparse.ArgumentParser(prog="python -m batched_fn.examples.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (closed loop)")
    parser.add_argument("--rate", default=None,
                        help="comma-separated mean request rates per second: open loop (Poisson) instead")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency level")
    parser.add_argument("--requests", type=int, default=None, help="stop each level after this many requests")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/") + "/embed"
    if args.rate is not None:
        print(f"{'rate':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}  statuses   (open loop, from scheduled send)")
        for rate in (float(r) for r in args.rate.split(",")):
            r = run_open_load_sync(url, rate, duration=args.duration, requests=args.requests)
            print(f"{rate:>7g} {r.rps:>9.1f} {r.percentile(0.5) * 1e3:>9.2f} {r.percentile(0.99) * 1e3:>9.2f}  "
                  f"{dict(r.statuses)} transport_errors={r.transport_errors}")
        return
    print(f"{'conc':>5} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}  statuses")
    for level in (int(c) for c in args.concurrency.split(",")):
        r = run_load_sync(url, level, duration=args.duration, requests=args.requests)
        print(f"{level:>5} {r.rps:>9.1f} {r.percentile(0.5) * 1e3:>9.2f} {r.percentile(0.99) * 1e3:>9.2f}  "
              f"{dict(r.statuses)} transport_errors={r.transport_errors}")


if __name__ == "__main__":
    main()
