"""A short workload for the sanitizer builds of the core (``make asan``).

Threads, futures and asyncio callers with handler faults, timeouts,
cancellations, priorities, overload (eviction, shedding) and close() racing
the callers, on unkeyed and keyed (batch_key=) functions.  A plain script: it
exits 0 when every request got exactly one outcome of its own, 1 otherwise.
Run it against an ASan/TSan build with PYTHONPATH pointing at that build.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time

from batched_fn import BatchedFnError, Closed, Failed, Full, batched_fn

ROUNDS = int(os.environ.get("WORKLOAD_ROUNDS", "3"))
PER_CLIENT = int(os.environ.get("WORKLOAD_REQUESTS", "400"))


def handler(batch: list[int]) -> list[object]:
    if any(x % 97 == 13 for x in batch):
        raise ValueError("injected batch fault")
    if any(x % 211 == 5 for x in batch):
        raise KeyboardInterrupt   # a BaseException from the handler
    if any(x % 389 == 7 for x in batch):
        return batch[:-1]         # wrong length
    return [Failed(LookupError(x)) if x % 31 == 3 else x * 2 for x in batch]


def check(x: int, kind: str, value: object, problems: list[str]) -> None:
    if kind == "value":
        if value != x * 2:
            problems.append(f"{x}: mis-routed {value!r}")
    elif kind == "error":
        if not isinstance(value, (ValueError, LookupError, BatchedFnError, TimeoutError,
                                  concurrent.futures.TimeoutError)):
            problems.append(f"{x}: unexpected {value!r}")
    elif kind != "cancelled":
        problems.append(f"{x}: {kind}")


def priority(x: int) -> int:
    return x % 3 - 1


def one_round(seed: int) -> list[str]:
    fn = batched_fn(handler, max_batch_size=8, max_delay=0.0005, num_workers=2,
                    channel_cap=64, on_full="reject" if seed % 2 else "drop_oldest",
                    batch_key=(lambda x: x % 5) if seed % 3 == 1 else None)
    problems: list[str] = []
    keyed = seed % 4 >= 2     # keyed batches (batch_key=) in every other pair of rounds

    def checked_handler(batch: list[int]) -> list[object]:
        if keyed and len({x % 3 for x in batch}) != 1:
            problems.append(f"a batch mixed keys: {batch}")
        return handler(batch)

    fn = batched_fn(checked_handler, max_batch_size=8, max_delay=0.0005, num_workers=2,
                    channel_cap=64, on_full="reject" if seed % 2 else "drop_oldest",
                    batch_key=(lambda x: x % 3) if keyed else None)
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def record(x: int, kind: str, value: object) -> None:
        with lock:
            seen[x] = seen.get(x, 0) + 1
        check(x, kind, value, problems)

    def blocking(base: int) -> None:
        for x in range(base, base + PER_CLIENT):
            try:
                record(x, "value", fn(x, timeout=0.05 if x % 7 == 0 else None, priority=priority(x)))
            except (Full, Closed) as exc:
                record(x, "error", BatchedFnError(str(exc)))
            except BaseException as exc:  # noqa: BLE001
                record(x, "error", exc)

    def futures(base: int) -> None:
        pending = []
        for x in range(base, base + PER_CLIENT):
            try:
                fut = fn.submit(x, timeout=0.05 if x % 5 == 0 else None, priority=priority(x))
            except (Full, Closed) as exc:
                record(x, "error", BatchedFnError(str(exc)))
                continue
            if x % 11 == 0:
                fut.cancel()
            pending.append((x, fut))
        for x, fut in pending:
            try:
                record(x, "value", fut.result(20))
            except concurrent.futures.CancelledError:
                record(x, "cancelled", None)
            except BaseException as exc:  # noqa: BLE001
                record(x, "error", exc)

    def async_client(base: int) -> None:
        async def one(x: int) -> None:
            try:
                record(x, "value", await fn.acall(x, timeout=0.05 if x % 3 == 0 else None, priority=priority(x)))
            except asyncio.CancelledError:
                record(x, "cancelled", None)
            except BaseException as exc:  # noqa: BLE001
                record(x, "error", exc)

        async def main() -> None:
            tasks = [asyncio.ensure_future(one(x)) for x in range(base, base + PER_CLIENT)]
            await asyncio.sleep(0.001)
            for t in tasks[::13]:
                t.cancel()
            await asyncio.wait(tasks, timeout=20)

        asyncio.run(main())

    threads = [threading.Thread(target=target, args=(k * 100_000,))
               for k, target in enumerate([blocking, blocking, futures, async_client])]
    for t in threads:
        t.start()
    time.sleep(0.02 * (seed % 3))
    if seed % 2 == 0:
        fn.close()            # close while callers are in flight
    for t in threads:
        t.join(60)
    fn.close()
    if any(t.is_alive() for t in threads):
        problems.append("a client hung")
    expected = {k * 100_000 + i for k in range(4) for i in range(PER_CLIENT)}
    missing = expected - seen.keys()
    duplicated = [x for x, n in seen.items() if n != 1]
    if missing:
        problems.append(f"{len(missing)} requests lost")
    if duplicated:
        problems.append(f"{len(duplicated)} requests with several outcomes")
    s = fn.stats()
    if s.queued or s.running or s.submitted != s.completed + s.failed + s.timed_out + s.cancelled:
        problems.append(f"stats do not add up: {s}")
    return problems


def main() -> int:
    problems: list[str] = []
    for seed in range(ROUNDS * 2):
        problems += one_round(seed)
    for p in problems[:20]:
        print("problem:", p, file=sys.stderr)
    print(f"sanitizer workload: {ROUNDS * 2} rounds, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
