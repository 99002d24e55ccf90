"""benchmarks/c/openloop.c: the open-loop HTTP load generator, against a small local server.

It is compiled here with the machine's C compiler (CI has gcc); without one the test fails
and says so.  Each run is about a second at a low rate; the counts must add up.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "benchmarks" / "c" / "openloop.c"


class _Handler(http.server.BaseHTTPRequestHandler):
    """POST: 200 with a JSON body; a body naming "busy" gets 429, "close" closes the connection,
    "chunked" answers chunked, "slow" sleeps 0.3 s first."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if b"slow" in body:
            time.sleep(0.3)
        code = 429 if b"busy" in body else 200
        out = json.dumps({"embedding": [0.5] * 8}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        if b"close" in body:
            self.send_header("Connection", "close")
        if b"chunked" in body:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(out) // 2
            self.wfile.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, out[:half], len(out) - half, out[half:]))
        else:
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        if b"close" in body:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def openloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc or gcc, or $CC) to build benchmarks/c/openloop.c")
    exe = tmp_path_factory.mktemp("openloop") / "openloop"
    proc = subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE), "-lm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.fixture(scope="module")
def url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/embed"
    server.shutdown()
    server.server_close()


def run(exe: Path, *args: str, log: Path | None = None) -> dict:
    cmd = [str(exe), *args] + (["--log", str(log)] if log else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _adds_up(summary: dict) -> None:
    answered = sum(summary["status"].values())
    assert summary["scheduled"] == answered + summary["blocked"] + summary["conn_errors"] + summary["unanswered"]
    assert summary["sent"] == summary["scheduled"] - summary["blocked"]
    assert sum(c["scheduled"] for c in summary["classes"]) == summary["scheduled"]
    assert sum(c["ok"] for c in summary["classes"]) == summary["status"].get("200", 0)
    assert summary["good"] == sum(c["good"] for c in summary["classes"]) <= summary["status"].get("200", 0)


def test_counts_add_up_and_classes_get_their_status(openloop, url, tmp_path):
    log = tmp_path / "requests.log"
    summary = run(openloop, "--url", url, "--body", '{"text": "hi"}', "--body2", '{"text": "busy"}',
                  "--share2", "0.25", "--rate", "200", "--duration", "1", "--warmup", "0.2", "--seed", "7",
                  "--connections", "64", log=log)
    _adds_up(summary)
    assert 120 < summary["scheduled"] < 300          # Poisson at 200/s over 1 s
    assert summary["blocked"] == summary["conn_errors"] == summary["unanswered"] == 0
    assert set(summary["status"]) <= {"200", "429"}
    low, high = summary["classes"]
    assert summary["status"]["200"] == low["scheduled"] == low["ok"]
    assert summary["status"]["429"] == high["scheduled"] > 0 and high["ok"] == 0
    assert summary["p50_ms"] is not None and summary["p50_ms"] <= summary["p99_ms"]
    assert summary["cpu_user_s"] + summary["cpu_sys_s"] < summary["wall_s"]
    lines = log.read_text().splitlines()   # every request, the warm-up's included
    assert len(lines) >= summary["scheduled"]
    sched = [int(line.split()[0]) for line in lines]
    assert sched == sorted(sched) and sched[-1] < 1_200_000
    assert sum(1 for line in lines if int(line.split()[0]) >= 200_000) == summary["scheduled"]


def test_same_seed_same_schedule(openloop, url, tmp_path):
    args = ["--url", url, "--body", '{"text": "hi"}', "--rate", "100", "--duration", "0.5", "--seed", "3"]
    one, two = tmp_path / "one.log", tmp_path / "two.log"
    run(openloop, *args, log=one)
    run(openloop, *args, log=two)
    assert [line.split()[0] for line in one.read_text().splitlines()] == \
        [line.split()[0] for line in two.read_text().splitlines()]


def test_connection_close_and_chunked_bodies_are_read(openloop, url):
    summary = run(openloop, "--url", url, "--body", '{"text": "close"}', "--body2", '{"text": "chunked"}',
                  "--share2", "0.5", "--rate", "100", "--duration", "0.6", "--connections", "16")
    _adds_up(summary)
    assert summary["status"] == {"200": summary["scheduled"]} and summary["conn_errors"] == 0
    assert summary["connections_opened"] >= summary["classes"][0]["scheduled"]   # one per closed answer


def test_a_full_pool_blocks_instead_of_queueing(openloop, url):
    summary = run(openloop, "--url", url, "--body", '{"text": "slow"}', "--rate", "50", "--duration", "0.6",
                  "--connections", "2", "--drain-ms", "1000")
    _adds_up(summary)
    assert summary["blocked"] > 0 and summary["connections_opened"] == 2
    assert summary["status"]["200"] == summary["sent"]
    assert summary["good"] == 0                      # 300 ms each, against a 50 ms SLO


def test_refused_connections_are_counted(openloop):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]          # bound, never listening: connect is refused
        summary = run(openloop, "--url", f"http://127.0.0.1:{port}/embed", "--body", "{}", "--rate", "50",
                      "--duration", "0.3")
    _adds_up(summary)
    assert summary["conn_errors"] == summary["scheduled"] > 0 and summary["status"] == {}


def test_bad_arguments_are_named(openloop):
    proc = subprocess.run([str(openloop), "--url", "127.0.0.1:80/x", "--body", "{}", "--rate", "1", "--duration", "1"],
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "openloop: --url must start with http://" in proc.stderr
    proc = subprocess.run([str(openloop), "--url", "http://127.0.0.1:1/x", "--body", "{}", "--rate", "1e7",
                           "--duration", "1"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "exceeds 4,000,000 requests" in proc.stderr
