"""The threaded example server (examples/threaded_server.py): HTTP workers as threads of one process.

It needs a free-threaded CPython with the GIL off, and refuses to start elsewhere.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import FREE_THREADED, GIL_FORCED, gil_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    if not os.environ.get("BATCHED_FN_TEST_INSTALLED"):
        env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_free_threading_problem_names_what_is_missing() -> None:
    from batched_fn.examples.threaded_server import free_threading_problem

    problem = free_threading_problem()
    if not FREE_THREADED:
        assert problem is not None and problem.startswith("--threads needs a free-threaded CPython (3.13t")
        assert "use --workers N" in problem
    elif gil_enabled():
        assert problem is not None and problem.startswith("--threads needs the GIL off, but it is on")
    else:
        assert problem is None


def test_refuses_to_start_with_a_gil_and_says_why() -> None:
    """On a regular build, or a free-threaded one with PYTHON_GIL=1: exit status 2 and the reason."""
    env = _env(PYTHON_GIL="1") if FREE_THREADED else _env()
    proc = subprocess.run([sys.executable, "-m", "batched_fn.examples.threaded_server", "--threads", "2",
                           "--model", "toy", "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    expected = ("--threads needs the GIL off, but it is on" if FREE_THREADED
                else "--threads needs a free-threaded CPython (3.13t or later)")
    assert f"batched_fn threaded server: {expected}" in proc.stderr
    assert "ready on" not in proc.stdout


def test_invalid_thread_count_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "batched_fn.examples.threaded_server", "--threads", "0"],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode != 0
    assert "invalid --threads value: expected an int >= 1 (got 0)" in proc.stderr


@pytest.mark.skipif(not FREE_THREADED or GIL_FORCED, reason="needs a free-threaded CPython with the GIL off")
def test_threads_answer_through_one_batcher_and_stop_on_sigterm() -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from batched_fn.examples.models import ToyEmbedder

    proc = subprocess.Popen([sys.executable, "-m", "batched_fn.examples.threaded_server", "--threads", "3",
                             "--model", "toy", "--port", "0", "--max-delay", "0.002"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        match = re.search(r"ready on (http://\S+) \(.*3 HTTP threads, GIL off\)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        url = match.group(1)
        texts = [f"text {i}" for i in range(90)]
        answers: dict[str, list[float]] = {}
        errors: list[str] = []

        def client(part: list[str]) -> None:
            with httpx.Client(timeout=30) as c:
                for t in part:
                    r = c.post(url + "/embed", json={"text": t})
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        answers[t] = r.json()["embedding"]

        clients = [threading.Thread(target=client, args=(texts[i::9],)) for i in range(9)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        assert not errors, errors[:3]
        want = ToyEmbedder().embed(texts)
        for t, vec in zip(texts, want):
            assert answers[t] == pytest.approx(vec), t
        # one batcher behind every thread: /stats counts all 90 whichever thread answers
        threads_seen = set()
        for _ in range(12):
            stats = httpx.get(url + "/stats", timeout=10).json()
            assert stats["completed"] == 90 and stats["submitted"] == 90
            threads_seen.add(stats["thread"])
        assert threads_seen <= {f"batched_fn-http-{i}" for i in range(3)}
        assert httpx.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
        metrics = httpx.get(url + "/metrics", timeout=10)
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            assert metrics.status_code == 404
        else:
            assert metrics.status_code == 200
            assert 'embed_requests_total{outcome="completed"} 90.0' in metrics.text
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(30) == 0, proc.stderr.read()
        assert time.monotonic() - start < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not FREE_THREADED or GIL_FORCED, reason="needs a free-threaded CPython with the GIL off")
def test_granian_threads_answer_through_one_batcher() -> None:
    """--http granian: granian's worker threads serve the app over the one batched function.

    (granian 2.7.9 aborts on its way out on a free-threaded build, so the server is killed here,
    not stopped.)"""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("granian")
    pytest.importorskip("fastapi")
    from batched_fn.examples.models import ToyEmbedder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "batched_fn.examples.threaded_server", "--http", "granian",
                             "--threads", "2", "--model", "toy", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert "2 HTTP threads (granian), GIL off" in line, line
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "granian did not start"
                time.sleep(0.1)
        texts = [f"g {i}" for i in range(40)]
        got: dict[str, list[float]] = {}

        def client(part: list[str]) -> None:
            with httpx.Client(timeout=30) as c:
                for t in part:
                    r = c.post(url + "/embed", json={"text": t})
                    assert r.status_code == 200, r.text
                    got[t] = r.json()["embedding"]

        clients = [threading.Thread(target=client, args=(texts[i::4],)) for i in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        for t, vec in zip(texts, ToyEmbedder().embed(texts)):
            assert got[t] == pytest.approx(vec), t
        assert httpx.get(url + "/stats", timeout=10).json()["completed"] == 40
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
