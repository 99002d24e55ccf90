"""--loop-lag-factor: a server whose event loop runs behind answers POST /embed 503 at once.

Past its capacity a one-process server falls behind: requests wait in the
kernel for the busy event loop, and their answers wait for it again, a time
``timeout=`` never sees.  The server takes the loop's lag times the factor off
each request's timeout and sheds what has nothing left, in the HTTP protocol
(before any app code runs) and in the app.  Here the loop is made to run
behind on purpose: the process is stopped (SIGSTOP) while requests arrive, or
the loop is blocked in-process.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from batched_fn.examples.demo import ServerProcess  # noqa: E402
from batched_fn.examples.server import LoopLag, ServerConfig, create_app, parse_config  # noqa: E402

OVERLOADED = "server overloaded: its event loop runs "


def test_loop_lag_reads_how_far_behind_the_loop_runs(run_async: Callable[..., Any]) -> None:
    lag = LoopLag(factor=4.0)

    async def main() -> None:
        assert lag.seconds() < 0.1             # the first use starts this loop's timer
        await asyncio.sleep(0.01)
        time.sleep(0.15)                       # the loop is blocked: its timer is overdue
        behind = lag.seconds()
        assert behind >= 0.14                  # read before the timer's callback could run
        assert lag.behind() >= 4 * 0.14
        await asyncio.sleep(0.001)             # the late callback runs and keeps the reading
        assert lag.summary()["max_lag_ms"] >= 140
        for _ in range(200):                   # the loop keeps up again: the lag falls back
            await asyncio.sleep(0.005)
            if lag.seconds() < 0.02:
                break
        assert lag.seconds() < 0.02

    run_async(main())


@pytest.mark.parametrize("kwargs, message", [
    ({"factor": 0}, "invalid factor value: expected a number > 0 (got 0)"),
    ({"factor": math.nan}, "invalid factor value: expected a number > 0 (got nan)"),
    ({"interval": -1.0}, "invalid interval value: expected seconds > 0 (got -1.0)"),
])
def test_loop_lag_refuses_bad_knobs(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoopLag(**kwargs)


def test_loop_lag_factor_knob(capsys: pytest.CaptureFixture[str]) -> None:
    assert ServerConfig().loop_lag_factor == 4.0
    assert parse_config(["--loop-lag-factor", "0"], env={}).loop_lag_factor == 0.0
    assert parse_config([], env={"BATCHED_FN_LOOP_LAG_FACTOR": "2.5"}).loop_lag_factor == 2.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse_config(["--loop-lag-factor", bad], env={})
        assert f"invalid loop_lag_factor value: expected a number >= 0 (got {float(bad)!r})" \
            in capsys.readouterr().err


def test_the_app_sheds_while_its_loop_runs_behind(run_async: Callable[..., Any]) -> None:
    app = create_app(ServerConfig(model="toy", toy_dim=8, timeout=0.5))

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.post("/embed", json={"text": "on time"})
            time.sleep(0.2)                    # the loop stalls: 4 x 0.2 s is more than the 0.5 s timeout
            late = await client.post("/embed", json={"text": "late"})
            for _ in range(200):
                await asyncio.sleep(0.005)
                if app.state.lag.seconds() < 0.02:
                    break
            again = await client.post("/embed", json={"text": "on time again"})
            stats = await client.get("/stats")
            return [first, late, again, stats]

    try:
        first, late, again, stats = run_async(go())
    finally:
        app.state.batcher.close()
    assert first.status_code == 200 and again.status_code == 200
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert late.json()["error"].startswith(OVERLOADED)
    assert stats.json()["loop"]["shed"] == 1


class Server(ServerProcess):
    """A server subprocess; ``stop()`` sends SIGTERM and returns its exit code."""

    def __init__(self, *args: str) -> None:
        super().__init__(args, 60.0)


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    made = [httpx.Client(timeout=30) for _ in range(6)]
    yield made
    for c in made:
        c.close()


@pytest.mark.parametrize("factor", ["4", "0"])
def test_a_stalled_server_sheds_what_it_can_no_longer_answer_in_time(factor: str, clients: list[Any]) -> None:
    server = Server("--model", "toy", "--toy-dim", "8", "--timeout", "0.5", "--loop-lag-factor", factor)
    try:
        for c in clients:                      # one kept-alive connection each, already accepted
            assert c.post(server.url + "/embed", json={"text": "warm"}).status_code == 200
        answers: list[Any] = [None] * len(clients)

        def send(i: int) -> None:
            c = clients[i]
            answers[i] = c.get(server.url + "/stats") if i == 0 else c.post(server.url + "/embed",
                                                                              json={"text": f"t{i}"})

        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(clients))]
            for t in threads:
                t.start()
            time.sleep(0.3)                     # the requests wait in the kernel for the stopped loop
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        for t in threads:
            t.join(30)
        stats, embeds = answers[0], answers[1:]
        assert stats.status_code == 200        # only POST /embed is shed
        if factor == "0":                      # the loop's lag is not counted: all answered
            assert [r.status_code for r in embeds] == [200] * len(embeds)
        else:
            assert [r.status_code for r in embeds] == [503] * len(embeds), [r.text for r in embeds]
            assert all(r.headers["retry-after"] == "1" and r.json()["error"].startswith(OVERLOADED)
                       for r in embeds)
        time.sleep(0.05)                         # the loop keeps up again: the same connections are answered
        assert [c.post(server.url + "/embed", json={"text": "x"}).status_code for c in clients] == [200] * 6
        loop = clients[0].get(server.url + "/stats").json()["loop"]
        if factor == "0":
            assert loop is None
        else:
            assert loop["shed"] == len(embeds)
    finally:
        assert server.stop() == 0
