"""Helpers for the cross-process tests: unique names and processes that share or connect.

``python _shared_tools.py owner NAME`` shares a function under NAME (inputs
doubled; ``"hang"`` never returns) and prints ``ready``; ``client NAME N``
connects, submits N calls of ``(pid, i)`` and prints ``submitted``, then
waits for them.  Both exit when stdin closes, so no process outlives its test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":   # run as a script: tests/ (helpers.py) is not on the path yet
    sys.path.insert(0, os.path.dirname(HERE))

from helpers import PACKAGE_DIR  # noqa: E402


def share_and_connect(handler: Any, max_item_bytes: int = 4 << 20, **knobs: Any) -> tuple[Any, str, Any]:
    """(fn, name, remote): a batched function of handler shared under a fresh name, and a connection to it."""
    from batched_fn import batched_fn, connect

    fn = batched_fn(handler, **knobs)
    name = unique_name()
    fn.share(name, max_item_bytes=max_item_bytes)
    return fn, name, connect(name, timeout=5)


def unique_name(prefix: str = "t") -> str:
    """A name no other test (or test session on this machine) uses."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def spawn(*args: str) -> subprocess.Popen:
    """Start this file in a fresh interpreter with args; stdin/stdout are pipes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_DIR, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    env.pop("PYTHONASYNCIODEBUG", None)
    return subprocess.Popen([sys.executable, os.path.join(HERE, "_shared_tools.py"), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def expect_line(proc: subprocess.Popen, want: str, seconds: float = 30.0) -> None:
    """Wait (bounded) for proc to print the line want."""
    got: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        got.append(proc.stdout.readline().strip())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(seconds)
    if not got or got[0] != want:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"expected {want!r} from the subprocess, got {got!r}; stderr:\n{err}")


def stop(proc: subprocess.Popen) -> None:
    """Kill proc if it still runs and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def _owner(name: str) -> None:
    from batched_fn import batched_fn

    gate = threading.Event()

    def handler(batch: list) -> list:
        if "hang" in batch:
            gate.wait()
        return [x * 2 for x in batch]

    fn = batched_fn(handler, max_batch_size=64, max_delay=0.001)
    fn.share(name)
    print("ready", flush=True)
    sys.stdin.read()   # until the test closes stdin (or kills us)
    fn.close()


def _client(name: str, n: int) -> None:
    from batched_fn import connect

    remote = connect(name, timeout=10)
    futs = [remote.submit((os.getpid(), i)) for i in range(n)]
    time.sleep(0.05)
    print("submitted", flush=True)
    for fut in futs:
        fut.result(timeout=30)
    print("done", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1] == "owner":
        _owner(sys.argv[2])
    else:
        _client(sys.argv[2], int(sys.argv[3]))
