"""The README's ``model.py`` + ``app.py`` recipe (section "Several processes"), run as written.

The block is cut at ``# app.py`` into the two files; ``my_project.MyModel``
is a stand-in model written beside them.  Names live in a private
``XDG_RUNTIME_DIR``, so the recipe's fixed name "embed" clashes with nothing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
README = (ROOT / "README.md").read_text()

MY_PROJECT = '''
import os
import time


class MyModel:
    """Embeds a text as [its length, its first code point]; "boom" fails; a sleep per batch."""

    @classmethod
    def load(cls):
        return cls()

    def embed(self, batch):
        time.sleep(float(os.environ.get("RECIPE_BATCH_SECONDS", "0")))
        if "boom" in batch:
            raise RuntimeError("boom")
        return [[len(text), ord(text[0]) if text else 0] for text in batch]
'''


def recipe() -> tuple[str, str]:
    """The README's model.py and app.py, as written."""
    [block] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "# model.py" in b]
    model, app = block.split("# app.py", 1)
    return model, "# app.py" + app


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    model, app = recipe()
    (tmp_path / "model.py").write_text(model)
    (tmp_path / "app.py").write_text(app)
    (tmp_path / "my_project.py").write_text(MY_PROJECT)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    # the source tree's package, unless the suite tests an installed one (make test-ft, testinstalled)
    tree = [] if os.environ.get("BATCHED_FN_TEST_INSTALLED") else [str(ROOT / "python")]
    pythonpath = os.pathsep.join([str(tmp_path), *tree, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
    yield tmp_path, env


def start_model(cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "model.py"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sock = Path(env["XDG_RUNTIME_DIR"]) / "batched_fn"
    wait_until(lambda: any(p.suffix == ".sock" for p in sock.glob("embed*")) or proc.poll() is not None, 60,
               what="model.py sharing 'embed'")
    assert proc.poll() is None, proc.communicate()[0]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_model_py_runs_close_on_sigterm_and_ctrl_c(project: tuple[Path, dict[str, str]], sig: int) -> None:
    cwd, env = project
    proc = start_model(cwd, env)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out          # close() ran and main() returned: a clean exit
    assert "Traceback" not in out, out
    # close() withdrew the name: a new model.py can share it at once
    again = start_model(cwd, env)
    again.send_signal(signal.SIGTERM)
    assert again.wait(30) == 0


def test_app_py_maps_each_outcome_to_its_status(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    model = start_model(cwd, dict(env, RECIPE_BATCH_SECONDS="0.01"))
    port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--workers", "2", "--port", str(port)],
                           cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert app.poll() is None, app.communicate()[0]
            try:
                return httpx.get(url + "/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 60, what="app.py serving")
        answer = httpx.post(url + "/embed", json={"text": "hello"}, timeout=30)
        assert answer.status_code == 200 and answer.json() == {"vector": [5, ord("h")]}
        failed = httpx.post(url + "/embed", json={"text": "boom"}, timeout=30)
        assert failed.status_code == 500 and failed.json() == {"error": "model failed: RuntimeError"}
        stats = httpx.get(url + "/stats", timeout=30)
        assert stats.status_code == 200 and stats.json()["completed"] >= 1
        # a stuck model process: health says so, a call times out (504), both on time
        os.kill(model.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert httpx.get(url + "/healthz", timeout=30).status_code == 503
            late = httpx.post(url + "/embed", json={"text": "late"}, timeout=30)
            assert late.status_code == 504 and late.json() == {"error": "timed out"}
            assert time.monotonic() - start < 10    # a hang guard: 1 s each as written
        finally:
            os.kill(model.pid, signal.SIGCONT)
        # model.py stops: calls and health answer 503
        model.send_signal(signal.SIGTERM)
        assert model.wait(30) == 0
        gone = httpx.post(url + "/embed", json={"text": "gone"}, timeout=30)
        assert gone.status_code == 503 and gone.json() == {"error": "model unavailable"}
        assert gone.headers["retry-after"] == "5"
        assert httpx.get(url + "/healthz", timeout=30).status_code == 503
    finally:
        for proc in (app, model):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
