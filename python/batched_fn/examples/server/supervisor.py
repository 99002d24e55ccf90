"""``--workers N``: the supervisor, and what each child process it starts runs.

The process started is the supervisor.  It binds the listening socket, starts
one model process (unless ``--no-share``) and N HTTP workers that inherit the
socket, and prints the ready line once all of them said they are ready.  It
never serves a request itself.  While serving, it restarts a child that died
(the model process or an HTTP worker) after a back-off that doubles with each
death of that child in the last :data:`RESTART_WINDOW` seconds, and gives up
(stops every child, exits 1) when more than :data:`RESTART_LIMIT` children
died in that window.  HTTP workers survive a model restart: calls in flight
get 503, new calls reach the new model process.  On SIGINT/SIGTERM it stops
the workers (each answers every accepted request), then the model process,
all within ``--timeout`` + 10 s, and exits 0.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from .backend import CLOSE_JOIN_SECONDS, MODEL_LOAD_SECONDS, serve_model
from .config import ServerConfig

__all__ = ["supervise", "run_child", "ROLE_ENV", "RESTART_LIMIT", "RESTART_WINDOW"]

log = logging.getLogger("batched_fn.examples.server")

# the supervisor starts its children with the same flags and says in these
# environment variables what each one is
ROLE_ENV = "BATCHED_FN__ROLE"          # "model" or "http"
SHARED_ENV = "BATCHED_FN__SHARED"      # the name the model process shares under
LISTEN_ENV = "BATCHED_FN__LISTEN_FD"   # http: the listening socket, inherited
READY_ENV = "BATCHED_FN__READY_FD"     # a pipe to write one byte to once ready

#: more child deaths than this within RESTART_WINDOW seconds: the supervisor gives up (exit 1)
RESTART_LIMIT = 5
#: seconds over which child deaths are counted
RESTART_WINDOW = 60.0
#: seconds before the first restart of a child; doubled for each later death of it in the window
BACKOFF_FIRST = 0.5
#: the longest back-off
BACKOFF_MAX = 8.0
#: seconds the stop gives the HTTP workers beyond --timeout (their shutdown answers every request first)
WORKER_STOP_MARGIN = 5.0
#: the whole stop is over within --timeout + this many seconds (the promise is + 10)
STOP_BOUND = 9.5


# ---------------------------------------------------------------- in the children


def _signal_ready() -> None:
    fd = int(os.environ[READY_ENV])
    os.write(fd, b"1")
    os.close(fd)


def _parent_gone(parent: int) -> bool:
    return os.getppid() != parent


def _run_model_process(config: ServerConfig, name: str) -> int:
    """Load the model once, share it (see ``backend.serve_model``); serve until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the supervisor stops this process last
    parent = os.getppid()
    service = serve_model(config, name)
    try:
        _signal_ready()
        while not stop.wait(0.25):
            if _parent_gone(parent):   # the supervisor was killed: do not outlive it
                break
    finally:
        service.close()
    return 0


def _watch_parent(parent: int) -> None:
    """In an HTTP worker: SIGTERM this process (a graceful stop) if the supervisor disappears."""
    def watch() -> None:
        while not _parent_gone(parent):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="batched_fn-server-parent", daemon=True).start()


def _run_http_worker(config: ServerConfig) -> int:
    import socket

    from .app import create_app, serve

    _watch_parent(os.getppid())
    sock = socket.socket(fileno=int(os.environ[LISTEN_ENV]))
    app = create_app(config, os.environ.get(SHARED_ENV))
    app.state.port = sock.getsockname()[1]
    app.state.on_ready = _signal_ready
    return 0 if serve(config, app, sock) else 1


def run_child(role: str, config: ServerConfig) -> int:
    """Run as the child the supervisor started (role ``model`` or ``http``); the exit code."""
    if role == "model":
        return _run_model_process(config, os.environ[SHARED_ENV])
    if role == "http":
        return _run_http_worker(config)
    raise ValueError(f"invalid {ROLE_ENV} value: expected 'model' or 'http' (got {role!r})")


# ---------------------------------------------------------------- in the supervisor


class _Child:
    """One child slot (the model process, or an HTTP worker): its process and the pipe it says 'ready' on."""

    def __init__(self, role: str, argv: Sequence[str], env: dict[str, str], fds: tuple[int, ...] = ()) -> None:
        self.role = role
        self.argv = list(argv)
        self.env = env
        self.fds = fds
        self.deaths: collections.deque[float] = collections.deque()   # when it died, within the window
        self.restart_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_fd: int | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) its process with a fresh ready pipe."""
        read_fd, write_fd = os.pipe()
        env = dict(self.env, **{ROLE_ENV: self.role, READY_ENV: str(write_fd)})
        self.proc = subprocess.Popen([sys.executable, "-m", "batched_fn.examples.server", *self.argv],
                                     env=env, pass_fds=(write_fd, *self.fds))
        os.close(write_fd)
        self.ready_fd = read_fd
        self.restart_at = None

    @property
    def pid(self) -> int:
        """The process id of its latest process."""
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        """True while its latest process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _read_ready(self, wait: float) -> bool | None:
        """True once ready, False if it will never be (pipe closed), None if not yet."""
        if self.ready_fd is None:
            return True
        readable, _, _ = select.select([self.ready_fd], [], [], wait)
        if not readable:
            return None
        ok = os.read(self.ready_fd, 1) == b"1"
        os.close(self.ready_fd)
        self.ready_fd = None
        return ok

    def wait_ready(self, deadline: float, stopping: list[int]) -> bool:
        """Wait until it says it is ready (True), or for deadline, a signal or its exit (False)."""
        while time.monotonic() < deadline and not stopping:
            ready = self._read_ready(min(0.2, max(0.0, deadline - time.monotonic())))
            if ready is not None:
                return ready
        return False

    def poll_ready(self) -> None:
        """Close the ready pipe once a restarted child wrote to it (or exited)."""
        self._read_ready(0.0)

    def died(self, now: float) -> float:
        """Record a death; the back-off before its restart."""
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > RESTART_WINDOW:
            self.deaths.popleft()
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(self.deaths) - 1))


def _stop(children: Sequence[_Child], deadline: float, kill: bool = False) -> None:
    """SIGTERM (SIGKILL with kill) every child at once; SIGKILL those still running at deadline."""
    for child in children:
        if child.running():
            assert child.proc is not None
            if kill:
                child.proc.kill()
            else:
                child.proc.terminate()
                child.proc.send_signal(signal.SIGCONT)   # a stopped process acts on SIGTERM only once continued
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("%s process %d did not stop in time: killed", child.role, child.pid)
            child.proc.kill()
            child.proc.wait()
        if child.ready_fd is not None:
            os.close(child.ready_fd)
            child.ready_fd = None


def _too_many_deaths(children: Sequence[_Child], now: float) -> bool:
    recent = sum(1 for child in children for t in child.deaths if now - t <= RESTART_WINDOW)
    return recent > RESTART_LIMIT


def supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    """Start the model process (unless --no-share) and the HTTP workers; restart the dead; stop all on a signal."""
    from .app import listen, server_ready_line

    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    sock = listen(config)
    port = sock.getsockname()[1]
    name = f"batched_fn-server-{port}-{os.getpid()}"
    env = dict(os.environ)
    model: _Child | None = None
    workers: list[_Child] = []
    ready = False
    code = 1
    try:
        if not config.no_share:
            env[SHARED_ENV] = name
            model = _Child("model", argv, env)
        env[LISTEN_ENV] = str(sock.fileno())
        # the socket stays open here too: a restarted worker inherits it
        workers = [_Child("http", argv, env, (sock.fileno(),)) for _ in range(config.workers)]
        deadline = time.monotonic() + MODEL_LOAD_SECONDS
        for child in ([model] if model else []) + workers:
            if not child.wait_ready(deadline, stopping):
                if not stopping:
                    log.error("the %s process %d did not start", child.role, child.pid)
                return 0 if stopping else 1
        ready = True
        print(server_ready_line(config, port, f", workers={config.workers}, "
                         f"{'a model each' if config.no_share else 'one shared model'}"), flush=True)
        code = _watch(([model] if model else []) + workers, stopping)
        return code
    finally:
        began = time.monotonic()
        # the workers first (they answer every accepted request within --timeout
        # + a few seconds), then the model process they were calling; a server
        # that never became ready has no request to answer: killed at once
        _stop(workers, began + config.timeout + WORKER_STOP_MARGIN, kill=not ready)
        if model is not None:
            _stop([model], min(time.monotonic() + CLOSE_JOIN_SECONDS * 2 + 1, began + config.timeout + STOP_BOUND),
                  kill=not ready or code != 0)
        sock.close()


def _watch(children: list[_Child], stopping: list[int]) -> int:
    """Restart children that die until a signal (0) or too many deaths (1)."""
    while not stopping:
        time.sleep(0.1)
        now = time.monotonic()
        for child in children:
            if child.restart_at is not None:
                if now >= child.restart_at and not stopping:
                    child.start()
                    log.warning("%s process restarted as %d", child.role, child.pid)
                continue
            if child.running():
                child.poll_ready()
                continue
            assert child.proc is not None
            backoff = child.died(now)
            log.error("%s process %d exited with code %s", child.role, child.pid, child.proc.returncode)
            if _too_many_deaths(children, now):
                log.error("more than %d child processes died within %.0fs: giving up", RESTART_LIMIT,
                          RESTART_WINDOW)
                return 1
            child.restart_at = now + backoff
            log.warning("restarting the %s process in %.1fs", child.role, backoff)
    return 0
