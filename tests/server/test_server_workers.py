"""The example server with ``--workers 2``: two HTTP worker processes, one shared model process.

Each test starts the server for real (a supervisor process and its children)
serving the deterministic ``toy`` model.  No timing is asserted beyond hang
guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
np = pytest.importorskip("numpy")

from helpers import wait_until  # noqa: E402
from test_server import TOY_DIM, Server, post_many, serving  # noqa: E402
from test_server_faults import connect, raw_post, read_response  # noqa: E402

from batched_fn.examples.models import ToyEmbedder  # noqa: E402
from batched_fn.examples.server import ServerConfig, parse_config  # noqa: E402
from batched_fn.examples.server.backend import CONTROL_SECONDS  # noqa: E402

TOY = ("--model", "toy", "--toy-dim", str(TOY_DIM))


def children(pid: int) -> dict[int, str]:
    """The live child processes of pid, each with its role (model or http)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        found[int(entry)] = env.get(b"BATCHED_FN__ROLE", b"?").decode()
    return found


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(pids: list[int], seconds: float) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), seconds, what=f"processes {pids} gone")


@pytest.fixture(scope="module")
def shared_server() -> Iterator[Server]:
    with serving(*TOY, "--toy-batch-ms", "10", "--max-batch-size", "32", "--max-delay", "0.005",
                 "--workers", "2") as server:
        yield server


def test_two_http_workers_and_one_model_process_run(shared_server: Server) -> None:
    roles = sorted(children(shared_server.proc.pid).values())
    assert roles == ["http", "http", "model"]


def test_both_workers_serve_into_the_one_shared_batcher(shared_server: Server) -> None:
    url = shared_server.url
    before = httpx.get(url + "/stats").json()
    sent = 0
    by_worker: dict[int, int] = {}
    model = ToyEmbedder(dim=TOY_DIM)
    # a fresh connection each time lands on either worker; /stats on the same
    # connection names the worker that also answered the /embed
    for i in range(400):
        with httpx.Client(base_url=url, timeout=30) as client:
            pid = client.get("/stats").json()["pid"]
            answer = client.post("/embed", json={"text": f"text {i}"})
            sent += 1
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["embedding"], model.embed([f"text {i}"])[0], atol=1e-12)
        by_worker[pid] = by_worker.get(pid, 0) + 1
        if len(by_worker) == 2 and i >= 10:
            break
    assert len(by_worker) == 2, f"only one worker answered: {by_worker}"
    assert set(by_worker) == {p for p, role in children(shared_server.proc.pid).items() if role == "http"}
    answers = asyncio.run(post_many(url, [{"text": f"together {i}"} for i in range(64)]))
    assert [a.status_code for a in answers] == [200] * 64
    sent += 64
    # every worker's /stats is the model process's: it counts the requests of both
    for _ in range(6):
        after = httpx.get(url + "/stats").json()
        assert after["pid"] in by_worker
        assert after["submitted"] - before["submitted"] == sent
        assert after["completed"] - before["completed"] == sent
        assert after["config"]["workers"] == 2


def test_metrics_in_a_worker_report_the_shared_batcher(shared_server: Server) -> None:
    pytest.importorskip("prometheus_client")
    asyncio.run(post_many(shared_server.url, [{"text": f"m {i}"} for i in range(16)]))
    stats = httpx.get(shared_server.url + "/stats").json()
    text = httpx.get(shared_server.url + "/metrics").text
    completed = re.search(r'^embed_requests_total\{outcome="completed"\} (\S+)$', text, re.M)
    assert completed is not None, text
    assert float(completed.group(1)) == stats["completed"]


def test_stats_of_a_worker_report_both_processes_gc_and_its_latency(shared_server: Server) -> None:
    for i in range(40):   # fresh connections: both workers answer some
        assert httpx.post(shared_server.url + "/embed", json={"text": f"t {i}"}, timeout=30).status_code == 200
    stats = httpx.get(shared_server.url + "/stats").json()
    assert stats["latency"]["batch"]["count"] >= 1
    assert stats["model_gc"]["frozen_objects"] > 10000 and stats["gc"]["frozen_objects"] > 10000
    assert stats["latency"]["batch"]["p50_ms"] >= 10        # --toy-batch-ms 10, timed in the model process


def test_errors_map_as_in_one_process(shared_server: Server) -> None:
    bad = httpx.post(shared_server.url + "/embed", content=b'{"text": "bad \\ud800 text"}', timeout=30)
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("field 'text' cannot be encoded as UTF-8")
    assert httpx.get(shared_server.url + "/healthz").json() == {"status": "ok"}


def test_a_request_past_its_timeout_answers_504_through_the_shared_batcher() -> None:
    with serving(*TOY, "--toy-batch-ms", "400", "--max-batch-size", "1", "--workers", "2") as server:
        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/embed", json={"text": "slow"}))
                while (await client.get("/stats")).json()["running"] != 1:
                    await asyncio.sleep(0.005)
                late = client.post("/embed", json={"text": "late", "timeout": 0.05})
                return list(await asyncio.gather(first, late))

        first, late = asyncio.run(go())
        assert first.status_code == 200
        assert late.status_code == 504
        assert late.json() == {"error": "request was not answered within 0.05s"}
        assert httpx.get(server.url + "/stats").json()["timed_out"] == 1


def test_sigterm_answers_requests_in_flight_exits_0_and_leaves_no_process() -> None:
    server = Server(*TOY, "--toy-batch-ms", "300", "--max-batch-size", "4", "--workers", "2", "--timeout", "3")
    try:
        pids = list(children(server.proc.pid))
        assert len(pids) == 3

        async def go() -> list[httpx.Response]:
            pending = asyncio.ensure_future(post_many(server.url, [{"text": f"t{i}"} for i in range(4)]))
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                while (await client.get("/stats")).json()["running"] == 0:
                    await asyncio.sleep(0.005)
            server.proc.send_signal(signal.SIGTERM)
            return await pending

        answers = asyncio.run(go())
        # each request got a deliberate answer: its embedding, or 503 if it was still queued
        assert {a.status_code for a in answers} <= {200, 503}
        assert 200 in {a.status_code for a in answers}
        assert server.proc.wait(3 + 10) == 0
        gone(pids, 5)
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output


RESTARTING = {"error": "the model process is unavailable (restarting); retry shortly"}


def roles(pid: int, role: str) -> list[int]:
    return sorted(p for p, r in children(pid).items() if r == role)


def test_a_dead_model_process_is_restarted_and_the_workers_reconnect_without_restarting() -> None:
    with serving(*TOY, "--workers", "2", "--toy-batch-ms", "300") as server:
        http_pids = roles(server.proc.pid, "http")
        [model_pid] = roles(server.proc.pid, "model")

        async def in_flight_when_it_dies() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                pending = asyncio.ensure_future(client.post("/embed", json={"text": "in flight"}))
                while (await client.get("/stats")).json()["running"] == 0:
                    await asyncio.sleep(0.005)
                os.kill(model_pid, signal.SIGKILL)
                return await pending

        lost = asyncio.run(in_flight_when_it_dies())
        assert lost.status_code == 503
        assert lost.json() == RESTARTING
        assert lost.headers["retry-after"] == "2"
        statuses = []
        served_in_a_row = 0
        end = time.monotonic() + 60   # a hang guard: the restart takes a back-off and a model load
        while served_in_a_row < 8:     # fresh connections: both workers
            assert time.monotonic() < end, f"never served again after the model process died: {statuses}"
            answer = httpx.post(server.url + "/embed", json={"text": "hi"}, timeout=30)
            statuses.append(answer.status_code)
            if answer.status_code == 503:   # new calls wait for the new model process a while, then 503
                assert answer.json() == RESTARTING
                served_in_a_row = 0
                time.sleep(0.05)
            else:
                assert answer.status_code == 200, answer.text
                np.testing.assert_allclose(answer.json()["embedding"], ToyEmbedder(dim=TOY_DIM).embed(["hi"])[0])
                served_in_a_row += 1
        assert roles(server.proc.pid, "http") == http_pids, "an HTTP worker restarted because the model did"
        [new_model_pid] = roles(server.proc.pid, "model")
        assert new_model_pid != model_pid
        assert httpx.get(server.url + "/healthz", timeout=30).json() == {"status": "ok"}
        assert "Traceback" not in server.output, server.output
        family = list(children(server.proc.pid))
        code = server.stop()
        assert code == 0, server.output
        gone(family, 5)


def test_a_dead_http_worker_is_restarted() -> None:
    with serving(*TOY, "--workers", "2") as server:
        http_pids = roles(server.proc.pid, "http")
        os.kill(http_pids[0], signal.SIGKILL)
        wait_until(lambda: len(roles(server.proc.pid, "http")) == 2
                   and http_pids[0] not in roles(server.proc.pid, "http"),
                   30, what="a new HTTP worker")
        survivors = roles(server.proc.pid, "http")
        assert http_pids[1] in survivors
        answers = [httpx.post(server.url + "/embed", json={"text": f"r {i}"}, timeout=30) for i in range(20)]
        assert [a.status_code for a in answers] == [200] * 20
        code = server.stop()
        assert code == 0, server.output


def test_repeated_deaths_make_the_supervisor_give_up_with_exit_1() -> None:
    server = Server(*TOY, "--workers", "2")
    killed: set[int] = set()
    try:
        end = time.monotonic() + 90    # 6 deaths with back-offs 0.5, 1, 2, 4, 8 s and a model load each
        while server.proc.poll() is None:
            assert time.monotonic() < end, "the supervisor never gave up"
            for pid in roles(server.proc.pid, "model"):
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.05)
        family = list(children(server.proc.pid))
    finally:
        code = server.stop()
    assert code == 1, server.output
    assert len(killed) == 6
    assert "more than 5 child processes died within 60s: giving up" in server.output
    gone(family, 5)


def test_workers_exit_when_the_supervisor_is_killed() -> None:
    server = Server(*TOY, "--workers", "2")
    try:
        pids = list(children(server.proc.pid))
        assert len(pids) == 3
        server.proc.kill()
        server.proc.wait(10)
        gone(pids, 20)
    finally:
        server.stop()


def test_a_model_each_serves_with_its_own_batcher() -> None:
    with serving(*TOY, "--workers", "2", "--no-share") as server:
        assert sorted(children(server.proc.pid).values()) == ["http", "http"]
        answers = asyncio.run(post_many(server.url, [{"text": f"x {i}"} for i in range(16)]))
        assert [a.status_code for a in answers] == [200] * 16
        assert httpx.get(server.url + "/stats").json()["config"]["no_share"] is True


def test_length_buckets_through_the_shared_model_process() -> None:
    # the batch key runs in the model process for the workers' calls
    texts = ["abc", "a" * 100] * 8
    with serving(*TOY, "--workers", "2", "--length-buckets", "--toy-batch-ms", "10") as server:
        answers = asyncio.run(post_many(server.url, [{"text": t} for t in texts]))
        stats = httpx.get(server.url + "/stats").json()
    assert [a.status_code for a in answers] == [200] * len(texts)
    by_key = {float(k): v["submitted"] for k, v in stats["by_key"].items()}
    assert by_key == {8.0: 8, 128.0: 8}


def test_workers_and_max_delay_knobs() -> None:
    assert ServerConfig().max_delay == "auto" and ServerConfig().workers == 1
    config = parse_config(["--max-delay", "auto", "--workers", "3"], env={"BATCHED_FN_NO_SHARE": "1"})
    assert (config.max_delay, config.workers, config.no_share) == ("auto", 3, True)
    assert parse_config([], env={"BATCHED_FN_WORKERS": "2", "BATCHED_FN_MAX_DELAY": "0.01"}).workers == 2
    assert parse_config(["--max-delay", "0.01"], env={}).max_delay == 0.01


@pytest.mark.parametrize("argv, env, message", [
    (["--workers", "0"], {}, "invalid workers value: expected >= 1 (got 0)"),
    ([], {"BATCHED_FN_WORKERS": "two"}, "invalid BATCHED_FN_WORKERS value: 'two'"),
    ([], {"BATCHED_FN_NO_SHARE": "maybe"}, "invalid BATCHED_FN_NO_SHARE value: 'maybe'"),
    (["--max-delay", "soon"], {}, "argument --max-delay: invalid seconds or 'auto' value: 'soon'"),
])
def test_bad_worker_knobs_are_named(argv: list[str], env: dict[str, str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, env=env)
    assert message in capsys.readouterr().err


def test_a_model_that_fails_to_load_exits_nonzero_and_leaves_no_process() -> None:
    # toy_dim=-1 makes the toy model fail in the model process's worker
    env = dict(os.environ, BATCHED_FN_TOY_DIM="-1")
    proc = subprocess.Popen([sys.executable, "-m", "batched_fn.examples.server", "--model", "toy", "--port", "0",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until(lambda: len(children(proc.pid)) == 3 or proc.poll() is not None, 30, what="children started")
        pids = list(children(proc.pid))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "ready on" not in out
    assert "the model process" in out and "did not start" in out
    gone(pids, 5)


def test_a_full_shared_queue_answers_503_with_retry_after() -> None:
    with serving(*TOY, "--toy-batch-ms", "40", "--max-batch-size", "2", "--channel-cap", "2",
                 "--max-delay", "0", "--workers", "2") as server:
        answers = asyncio.run(post_many(server.url, [{"text": f"f {i}"} for i in range(40)]))
        busy = [a for a in answers if a.status_code == 503]
        assert busy and {a.status_code for a in answers} == {200, 503}
        for answer in busy:
            assert re.fullmatch(r"server busy: \d+ requests queued; retry in \d+s", answer.json()["error"])
            assert int(answer.headers["retry-after"]) >= 1
        assert httpx.get(server.url + "/stats").json()["rejected"] == len(busy)


# ------------------------------------------------------------------ a stuck model process (SIGSTOP)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    answer = call()
    return answer, time.monotonic() - start


def test_with_the_model_process_stopped_healthz_stats_and_embed_answer_on_time() -> None:
    # the promises: /healthz and /stats within CONTROL_SECONDS (2 s), /embed 504 at its timeout
    with serving(*TOY, "--workers", "2") as server:
        [model_pid] = roles(server.proc.pid, "model")
        assert httpx.post(server.url + "/embed", json={"text": "before"}, timeout=30).status_code == 200
        with stopped(model_pid):
            for _ in range(2):   # fresh connections: both workers
                health, took = timed(lambda: httpx.get(server.url + "/healthz", timeout=30))
                assert health.status_code == 503 and "error" in health.json()
                assert took < CONTROL_SECONDS + 1.5, took
                stats, took = timed(lambda: httpx.get(server.url + "/stats", timeout=30))
                assert stats.status_code == 503
                assert stats.json()["error"].startswith("model process unavailable")
                assert took < CONTROL_SECONDS + 1.5, took
                embed, took = timed(lambda: httpx.post(server.url + "/embed", json={"text": "x", "timeout": 1},
                                                       timeout=30))
                assert embed.status_code == 504, embed.text
                assert embed.json() == {"error": "request was not answered within 1.0s"}
                assert took < 1 + 1.5, took
        # continued: it answers again
        wait_until(lambda: httpx.get(server.url + "/healthz", timeout=30).status_code == 200, 10, what="healthy")
        assert httpx.post(server.url + "/embed", json={"text": "after"}, timeout=30).status_code == 200


def unread_connections(port: int) -> tuple[int, int]:
    """The server side's established connections on port, and how many of them hold unread bytes (Linux)."""
    count = unread = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "01":        # ESTABLISHED, the server's end
                count += 1
                unread += int(fields[4].split(":")[1], 16) > 0  # rx_queue
    return count, unread


def test_sigterm_with_300_requests_pending_on_a_stopped_model_answers_each_and_exits_in_time() -> None:
    timeout = 3.0
    server = Server(*TOY, "--workers", "2", "--timeout", str(timeout), "--channel-cap", "none")
    socks = []
    try:
        [model_pid] = roles(server.proc.pid, "model")
        family = list(children(server.proc.pid))
        os.kill(model_pid, signal.SIGSTOP)
        for i in range(300):   # raw sockets: every request is sent before the signal
            sock = connect(server.url)
            # 1.5 kB each: the workers' sockets to the model process fill up (a send must not block their loop)
            sock.sendall(raw_post(json.dumps({"text": f"pending {i} " + "long text " * 150}).encode()))
            socks.append(sock)
        # until the workers read every request (a connection not yet read is closed unanswered)
        port = int(server.url.rsplit(":", 1)[1])
        wait_until(lambda: unread_connections(port) == (300, 0), 30, what="every request read")
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answers = [read_response(sock) for sock in socks]
        code = server.proc.wait(timeout + 10)
        exited = time.monotonic() - signalled
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    assert code == 0, server.output
    assert exited < timeout + 10
    for status, body in answers:
        assert status in (503, 504), body
        assert list(body) == ["error"]
    gone(family, 5)
    assert "Traceback" not in server.output, server.output


def test_the_control_channel_answers_its_questions_and_refuses_others() -> None:
    from batched_fn import batched_fn
    from batched_fn.examples.server.backend import QUESTIONS, UnknownQuestion, _control_handler
    from batched_fn.examples.server.timing import GcPauses

    model = batched_fn(lambda texts: [[0.0] for _ in texts], max_batch_size=4)
    with batched_fn(_control_handler(model, GcPauses()), max_batch_size=16, max_delay=0.0) as control:
        assert control("healthy") is True
        stats = control("stats")
        assert stats["completed"] == 0 and "model_gc" in stats
        with pytest.raises(UnknownQuestion, match=r"unknown control question 'metric'; expected one of "
                                                  + re.escape(repr(QUESTIONS))):
            control("metric")
    model.close()
