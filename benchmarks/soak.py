"""Soak: many mixed requests through threads and asyncio with injected handler faults.

Counts, per request, how many outcomes its caller got and whether a result was
its own: reports lost (no outcome), duplicated (several) and mis-routed
(someone else's result), RSS at start/middle/end, and the cost of a refused
call (Full) while the worker is held.  Exits 1 if anything was lost,
duplicated or mis-routed, or if RSS grew by more than --max-rss-growth-mib.

    python benchmarks/soak.py --requests 1000000      # make soak
    python benchmarks/soak.py --requests 30000        # a CI-sized run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from array import array

import psutil

from batched_fn import Failed, Full, batched_fn


def handler(batch: list[int]) -> list[object]:
    if any(x % 1009 == 17 for x in batch):
        raise ValueError("injected batch fault")
    if any(x % 4099 == 3 for x in batch):
        raise KeyboardInterrupt   # a BaseException from the handler
    return [Failed(LookupError(x)) if x % 101 == 7 else x * 2 + 1 for x in batch]


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def refusal_cost(samples: int = 20_000) -> float:
    """Median seconds of a call refused with Full while the worker is held."""
    held, release = threading.Event(), threading.Event()

    def stuck(batch: list[object]) -> list[object]:
        held.set()
        release.wait()
        return batch

    fn = batched_fn(stuck, max_batch_size=1, max_delay=0, channel_cap=4)
    fn.submit(0)
    held.wait()
    for i in range(4):
        fn.submit(i)
    times = []
    for _ in range(samples // 100):
        t0 = time.perf_counter()
        for _ in range(100):
            try:
                fn.submit(1)
            except Full:
                pass
        times.append((time.perf_counter() - t0) / 100)
    release.set()
    fn.close()
    assert fn.stats().rejected == samples // 100 * 100
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=3, help="threads of blocking callers")
    ap.add_argument("--async-concurrency", type=int, default=64)
    ap.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    args = ap.parse_args()

    n = args.requests
    outcomes = array("B", bytes(n))     # outcomes seen per request id
    misrouted = array("B", bytes(n))
    fn = batched_fn(handler, max_batch_size=32, max_delay=0.0005, num_workers=2, channel_cap=4096)
    counter = iter(range(n))
    take_lock = threading.Lock()
    done_count = [0]
    rss = {"start": rss_mib()}

    def next_id() -> int | None:
        with take_lock:
            return next(counter, None)

    def note(x: int, value: object) -> None:
        outcomes[x] = min(255, outcomes[x] + 1)    # under the GIL: a plain increment
        if value is not None and value != x * 2 + 1:
            misrouted[x] = 1
        done_count[0] += 1
        if done_count[0] == n // 2:
            rss["middle"] = rss_mib()

    def blocking() -> None:
        while (x := next_id()) is not None:
            while True:
                try:
                    note(x, fn(x))
                except Full as exc:
                    time.sleep(min(exc.retry_after, 0.001))
                    continue
                except Exception:   # the injected faults: an outcome all the same
                    note(x, None)
                break

    def futures() -> None:
        while True:
            batch = []
            for _ in range(256):
                x = next_id()
                if x is None:
                    break
                while True:
                    try:
                        batch.append((x, fn.submit(x)))
                        break
                    except Full:
                        time.sleep(0.0005)
            if not batch:
                return
            for x, fut in batch:
                exc = fut.exception(60)
                note(x, None if exc else fut.result())

    def asyncio_client() -> None:
        async def one() -> None:
            while (x := next_id()) is not None:
                while True:
                    try:
                        note(x, await fn.acall(x))
                    except Full:
                        await asyncio.sleep(0.0005)
                        continue
                    except Exception:
                        note(x, None)
                    break

        async def run() -> None:
            await asyncio.gather(*[one() for _ in range(args.async_concurrency)])

        asyncio.run(run())

    start = time.perf_counter()
    threads = [threading.Thread(target=blocking) for _ in range(args.threads)]
    threads += [threading.Thread(target=futures), threading.Thread(target=asyncio_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    fn.close()
    rss["end"] = rss_mib()
    rss.setdefault("middle", rss["end"])

    lost = sum(1 for c in outcomes if c == 0)
    duplicated = sum(1 for c in outcomes if c > 1)
    wrong = sum(misrouted)
    st = fn.stats()
    cost = refusal_cost()
    growth = rss["end"] - rss["middle"]
    print(f"requests {n}  in {elapsed:.1f}s  ({n / elapsed:,.0f}/s)")
    print(f"lost {lost}  duplicated {duplicated}  mis-routed {wrong}")
    print(f"stats: submitted {st.submitted} completed {st.completed} failed {st.failed} "
          f"rejected(retried) {st.rejected} batches {st.batches} mean batch {st.mean_batch_size:.1f}")
    print(f"RSS MiB: start {rss['start']:.1f}  middle {rss['middle']:.1f}  end {rss['end']:.1f}  "
          f"(growth middle->end {growth:+.1f})")
    print(f"refused call (Full) median: {cost * 1e6:.2f} us")
    bad = lost or duplicated or wrong or growth > args.max_rss_growth_mib or \
        st.submitted != st.completed + st.failed + st.timed_out + st.cancelled
    print("FAIL" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
