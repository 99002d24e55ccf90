"""Server-level peers: the example server, mosec and LitServe serving one toy model, driven by wrk.

Every server serves ``POST /embed`` ``{"text": "..."}`` -> ``{"embedding": [8 floats]}`` with
the same toy model (benchmarks/peer_toy.py: 2 ms + 50 µs per item, the GIL released), batches of
up to 32 and a 5 ms batching delay.  wrk drives each server at each connection count in turn
(ours, mosec, LitServe at 1 connection, then at 16, ...), a 1 s warm-up before each measured run,
and the median of ``--runs`` runs is reported with its ratio to mosec.  The servers not under
test are stopped (SIGSTOP to their process group) meanwhile: LitServe idles at ~15 % of a core.
Also recorded: the total RSS of each server's process tree and its CPU time per request.

Run it with the project's .venv (``make bench-servers``); the peers run from their own venv,
build/venv-peers, made by ``--install-peers`` without torch ever being resolved.  Servers bind
127.0.0.1 only; each runs in its own process group, killed whole at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from machine import cpu_model  # noqa: E402
PEER_VENV = ROOT / "build" / "venv-peers"
PEER_PY = PEER_VENV / "bin" / "python"
# mosec and LitServe pinned; LitServe without its deps (so nothing can pull torch), then the
# runtime deps its metadata names, and numpy for the toy model.
PEER_PINS = ("mosec==0.9.8", "litserve==0.2.19")
PEER_DEPS = ("fastapi>=0.112", "pyzmq>=22.0.0", "uvicorn[standard]>=0.29.0", "numpy")

SERVERS = ("ours", "ours2", "ours-pygc", "ours-pysi", "ours-nolag", "threads", "threadsg", "mosec", "litserve")
DEFAULT_SERVERS = ("ours", "mosec", "litserve")
LABELS = {"ours": "batched_fn example server", "ours2": "batched_fn example server --workers 2",
          "ours-pygc": "batched_fn example server, Python's GC defaults",
          "ours-pysi": "batched_fn example server, Python's 5 ms switch interval",
          "ours-nolag": "batched_fn example server, no shedding by loop lag",
          "threads": "batched_fn threaded server --threads 2 (3.13t, GIL off, uvicorn)",
          "threadsg": "batched_fn threaded server --threads 2 --http granian (3.13t, GIL off)",
          "mosec": "mosec 0.9.8", "litserve": "LitServe 0.2.19"}
# ours2: two HTTP worker processes sharing one model process (one batcher)
OURS2_ARGS = "--workers 2"
# ours-pygc: the collector left as Python sets it (no gc.freeze(), young passes every 700 allocations)
OURS_PYGC_ARGS = "--gc-freeze off --gc-threshold 0"
# ours-pysi: the GIL's switch interval left at Python's 5 ms (the server's default is 0.5 ms)
OURS_PYSI_ARGS = "--switch-interval 0.005"
# ours-nolag: the event loop's lag not taken off request timeouts (no 503 for it)
OURS_NOLAG_ARGS = "--loop-lag-factor 0"
_OURS_EXTRA = {"ours": "", "ours2": OURS2_ARGS, "ours-pygc": OURS_PYGC_ARGS, "ours-pysi": OURS_PYSI_ARGS,
               "ours-nolag": OURS_NOLAG_ARGS}
# threads: examples/threaded_server.py on a free-threaded CPython (make ft-venv), two HTTP threads
# of one process calling one batcher in-process
FT_PY = Path(os.environ.get("FT_PYTHON", ROOT / "build" / "venv-ft" / "bin" / "python"))
THREADS_ARGS = "--threads 2"
# The example server's toy model at the peers' cost and size (see peer_toy.py).
OURS_ARGS = ("--model toy --toy-dim 8 --toy-batch-ms 2 --toy-item-ms 0.05 --max-batch-size 32 "
             "--max-delay 0.005 --channel-cap 1024")
BODY = '{"text": "the quick brown fox jumps over the lazy dog"}'
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
READY_TIMEOUT_S = 90.0

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class WrkResult:
    """One wrk run: throughput, latency percentiles (ms) and failures."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int = 0


@dataclass
class Cell:
    """The measured runs of one server at one connection count."""

    runs: list[WrkResult] = field(default_factory=list)
    cpu_ms_per_req: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    #: ours: after each run, the server's latency by part (/stats "latency", merged over its HTTP workers)
    latency: list[dict[str, dict[str, float]]] = field(default_factory=list)
    #: ours: garbage-collector passes and their milliseconds during each run, summed over its processes
    gc_passes: list[float] = field(default_factory=list)
    gc_ms: list[float] = field(default_factory=list)

    def median(self, attr: str) -> float:
        """The median of one WrkResult field over the runs."""
        return statistics.median(getattr(r, attr) for r in self.runs)


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Read req/s, p50, p99 (ms), the request count and failures from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\b", text, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\b", text, re.M)
    count = re.search(r"^\s+(\d+) requests in", text, re.M)
    if not (rps and p50 and p99 and count):
        raise ValueError(f"wrk output lacks Requests/sec or the latency distribution: {text[-400:]!r}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return WrkResult(rps=float(rps.group(1)), p50_ms=_ms(*p50.groups()), p99_ms=_ms(*p99.groups()),
                     requests=int(count.group(1)), errors=errors)


#: the parts of a request's time the example server reports in /stats "latency", in order
PARTS = ("queue", "batch", "deliver", "http", "server")


def merge_latency(summaries: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """One latency summary from several HTTP workers' (means and percentiles weighted by their counts)."""
    merged: dict[str, dict[str, float]] = {}
    for part in PARTS:
        rows = [s[part] for s in summaries if part in s and s[part].get("count", 0) > 0]
        total = sum(r["count"] for r in rows)
        merged[part] = {"count": total}
        for stat in ("mean_ms", "p50_ms", "p99_ms"):
            merged[part][stat] = sum(r[stat] * r["count"] for r in rows) / total if total else 0.0
    return merged


def render_breakdown(cells: dict[tuple[str, int], Cell], servers: Sequence[str],
                     connections: Sequence[int]) -> str:
    """The markdown table: each part of ours' request time, p50 / p99 ms, beside wrk's p99."""
    head = "| server | connections | " + " | ".join(PARTS) + " | wrk p99 | GC passes / ms per run |"
    lines = [head, "|" + "---|" * (len(PARTS) + 4)]
    for server in servers:
        for conns in connections:
            cell = cells.get((server, conns))
            if cell is None or not cell.latency:
                continue
            row = [LABELS.get(server, server), str(conns)]
            for part in PARTS:
                p50 = statistics.median(run[part]["p50_ms"] for run in cell.latency)
                p99 = statistics.median(run[part]["p99_ms"] for run in cell.latency)
                row.append(f"{p50:.2f} / {p99:.2f}")
            row.append(f"{cell.median('p99_ms'):.1f}")
            if cell.gc_passes:
                row.append(f"{statistics.median(cell.gc_passes):.0f} / {statistics.median(cell.gc_ms):.1f}")
            else:
                row.append("n/a")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _k(rps: float) -> str:
    return f"{rps / 1000:.2f}k" if rps >= 1000 else f"{rps:.0f}"


def render_table(cells: dict[tuple[str, int], Cell], servers: Sequence[str],
                 connections: Sequence[int]) -> str:
    """The markdown table: req/s (ratio to mosec) · p50 / p99 ms, one row per connection count."""
    head = "| connections | " + " | ".join(LABELS.get(s, s) for s in servers) + " |"
    lines = [head, "|" + "---|" * (len(servers) + 1)]
    for conns in connections:
        row = [str(conns)]
        ref = cells.get(("mosec", conns))
        for server in servers:
            cell = cells.get((server, conns))
            if cell is None or not cell.runs:
                row.append("n/a")
                continue
            rps = cell.median("rps")
            text = f"{_k(rps)}"
            if ref is not None and ref.runs and server != "mosec":
                text += f" (×{rps / ref.median('rps'):.2f})"
            ours = cells.get(("ours", conns))
            if server == "ours2" and ours is not None and ours.runs:
                text += f" (×{rps / ours.median('rps'):.2f} of ours)"
            ours2 = cells.get(("ours2", conns))
            if server.startswith("threads") and ours2 is not None and ours2.runs:
                text += f" (×{rps / ours2.median('rps'):.2f} of ours2)"
            text += f" · {cell.median('p50_ms'):.1f} / {cell.median('p99_ms'):.1f}"
            if ref is not None and ref.runs and server != "mosec":
                text += f" (p99 ×{cell.median('p99_ms') / ref.median('p99_ms'):.2f})"
            errors = sum(r.errors for r in cell.runs)
            if errors:
                text += f" · {errors} errors"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_resources(cells: dict[tuple[str, int], Cell], servers: Sequence[str],
                     connections: Sequence[int]) -> str:
    """The markdown table: server CPU µs per request at each load, and the largest total RSS."""
    head = ("| server | " + " | ".join(f"CPU µs/req @{c}" for c in connections)
            + " | total RSS (MB, max) |")
    lines = [head, "|" + "---|" * (len(connections) + 2)]
    for server in servers:
        row = [LABELS.get(server, server)]
        rss: list[float] = []
        for conns in connections:
            cell = cells.get((server, conns))
            if cell is None or not cell.cpu_ms_per_req:
                row.append("n/a")
                continue
            row.append(f"{statistics.median(cell.cpu_ms_per_req) * 1000:.0f}")
            rss.extend(cell.rss_mb)
        row.append(f"{max(rss):.0f}" if rss else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --- everything below starts processes -------------------------------------------------------


def install_peers() -> None:
    """Create build/venv-peers with the pinned peers; torch is never resolved."""
    if not PEER_PY.exists():
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["mosec==0.9.8"], check=True)
    subprocess.run(pip + ["--no-deps", "litserve==0.2.19"], check=True)
    subprocess.run(pip + list(PEER_DEPS), check=True)
    probe = subprocess.run([str(PEER_PY), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, check=True)
    if probe.stdout.strip() != "None":
        raise RuntimeError(f"torch found in {PEER_VENV}: {probe.stdout.strip()!r}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(server: str, port: int, ours_args: str) -> list[str]:
    if server in _OURS_EXTRA:
        extra = shlex.split(_OURS_EXTRA[server])
        return ([sys.executable, "-m", "batched_fn.examples.server", "--host", "127.0.0.1",
                 "--port", str(port)] + shlex.split(OURS_ARGS) + shlex.split(ours_args) + extra)
    if server in ("threads", "threadsg"):
        extra = ["--http", "granian"] if server == "threadsg" else []
        return ([str(FT_PY), "-m", "batched_fn.examples.threaded_server", "--host", "127.0.0.1",
                 "--port", str(port)] + shlex.split(THREADS_ARGS) + extra + shlex.split(OURS_ARGS)
                + shlex.split(ours_args))
    if server == "mosec":
        return [str(PEER_PY), str(HERE / "peer_mosec.py"), "--address", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
    if server == "litserve":
        return [str(PEER_PY), str(HERE / "peer_litserve.py"), "--host", "127.0.0.1", "--port", str(port)]
    raise ValueError(f"unknown server: {server!r} (expected one of {list(SERVERS)})")


class Server:
    """One server in its own process group; ``url`` answers POST /embed once ``start`` returns."""

    def __init__(self, name: str, ours_args: str, logdir: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/embed"
        self.cmd = _command(name, self.port, ours_args)
        self.log = open(logdir / f"{name}.log", "wb")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> list[float]:
        """Start it, poll until /embed answers (bounded), and return the vector for BODY."""
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                req = urllib.request.Request(self.url, BODY.encode(), {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    return json.loads(resp.read())["embedding"]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready within {READY_TIMEOUT_S}s; see {self.log.name}")

    def introspect(self, workers: int) -> tuple[dict[str, dict[str, float]], tuple[int, float]] | None:
        """ours: its /stats ``latency`` merged over its HTTP workers, and GC (passes, ms) summed over its processes.

        Fresh connections land on any worker: /stats is asked (a bounded number of times) until
        every worker answered; with ``--workers`` the model process's ``model_gc`` comes along.
        """
        if not self.name.startswith("ours"):
            return None
        stats_url = self.url.rsplit("/", 1)[0] + "/stats"
        seen: dict[int, dict[str, object]] = {}
        for _ in range(20 * workers):
            with urllib.request.urlopen(stats_url, timeout=10) as resp:
                data = json.loads(resp.read())
            seen[data["pid"]] = data
            if len(seen) == workers:
                break
        gcs = [d["gc"] for d in seen.values()]
        model_gc = next(iter(seen.values())).get("model_gc")
        if model_gc is not None:
            gcs.append(model_gc)
        passes = sum(sum(g["collections"]) for g in gcs)  # type: ignore[index]
        ms = sum(sum(g["total_ms"]) for g in gcs)  # type: ignore[index]
        return merge_latency([d["latency"] for d in seen.values()]), (passes, ms)  # type: ignore[misc]

    def tree(self) -> list[object]:
        """The server's processes (psutil.Process), itself and every descendant."""
        import psutil

        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process tree so far."""
        import psutil

        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()  # type: ignore[attr-defined]
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_mb(self) -> float:
        """Total RSS of the process tree, MB (shared pages counted once per process)."""
        import psutil

        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss  # type: ignore[attr-defined]
            except psutil.NoSuchProcess:
                pass
        return total / 1e6

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP the whole group while another server is measured (LitServe polls ~15 % of a core idle)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the whole group."""
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after 10 s, then any stray descendant."""
        import psutil

        if self.proc is None:
            return
        procs = self.tree()
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(procs, timeout=5)  # type: ignore[arg-type]
        for proc in alive:  # a descendant that left the group
            proc.kill()
        self.log.close()


def run_wrk(url: str, conns: int, duration: int, lua: Path) -> str:
    """One bounded wrk run; its stdout."""
    threads = min(2, conns)
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--timeout", "5s",
           "--latency", "-s", str(lua), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=True)
    return proc.stdout


def plot(cells: dict[tuple[str, int], Cell], servers: Sequence[str], connections: Sequence[int],
         out: Path) -> None:
    """req/s and p99 against connections, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for server in servers:
        xs = [c for c in connections if cells.get((server, c)) and cells[(server, c)].runs]
        ax1.plot(xs, [cells[(server, c)].median("rps") for c in xs], marker="o", label=LABELS.get(server, server))
        ax2.plot(xs, [cells[(server, c)].median("p99_ms") for c in xs], marker="o", label=LABELS.get(server, server))
    for ax, ylabel in ((ax1, "requests/s (median)"), (ax2, "p99 latency, ms (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(connections), [str(c) for c in connections])
        ax.set_xlabel("wrk connections")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend()
    fig.suptitle("toy model (2 ms + 50 µs per item), batch 32, 5 ms delay, loopback")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _machine() -> str:
    return (f"{os.cpu_count()} vCPU {cpu_model()}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid connections value: expected ints like 1,16 (got {text!r})")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"invalid connections value: expected ints >= 1 (got {text!r})")
    return values


def _csv_servers(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SERVERS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"invalid servers value: expected some of {','.join(SERVERS)} (got {text!r})")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=_csv_servers, default=list(DEFAULT_SERVERS),
                        help="some of ours,ours2,ours-pygc,ours-pysi,ours-nolag,threads,threadsg,mosec,litserve "
                             "(ours2: ours with --workers 2; ours-pygc: ours with Python's GC settings; "
                             "ours-pysi: ours with Python's 5 ms GIL switch interval; ours-nolag: ours without "
                             "shedding by event-loop lag; threads, threadsg: the "
                             "threaded server on build/venv-ft's free-threaded CPython, uvicorn or granian)")
    parser.add_argument("--connections", type=_csv_ints, default=[1, 16, 64, 256], help="wrk -c values")
    parser.add_argument("--duration", type=int, default=4,
                        help="seconds per measured wrk run (wrk takes whole seconds)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before each measured run")
    parser.add_argument("--runs", type=int, default=2, help="measured runs per cell (median)")
    parser.add_argument("--ours-args", default="", help="extra flags for batched_fn.examples.server")
    parser.add_argument("--install-peers", action="store_true", help="create/refresh build/venv-peers first")
    parser.add_argument("--out", type=Path, default=HERE / "results_servers.md")
    parser.add_argument("--plot", type=Path, default=HERE / "servers.png")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 60):
        parser.error(f"invalid duration value: expected 0 < seconds <= 60 (got {args.duration!r})")
    if not (0 <= args.warmup <= 10):
        parser.error(f"invalid warmup value: expected 0 <= seconds <= 10 (got {args.warmup!r})")
    if not (1 <= args.runs <= 10):
        parser.error(f"invalid runs value: expected 1..10 (got {args.runs!r})")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Install (optionally), start every server, measure interleaved, write the table and the plot."""
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    if args.install_peers:
        install_peers()
    if any(s.startswith("threads") for s in args.servers) and not FT_PY.exists():
        sys.exit(f"no {FT_PY}: run make ft-venv (or set FT_PYTHON to a free-threaded CPython with batched_fn)")
    if any(s in ("mosec", "litserve") for s in args.servers) and not PEER_PY.exists():
        sys.exit(f"no {PEER_PY}: run with --install-peers")
    logdir = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    lua = logdir / "post.lua"
    lua.write_text(LUA)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = os.getloadavg()[0]
    servers = [Server(name, args.ours_args, logdir) for name in args.servers]
    cells: dict[tuple[str, int], Cell] = {}
    try:
        vectors = {}
        for server in servers:
            vectors[server.name] = server.start()
            print(f"{server.name} ready on {server.url} ({len(vectors[server.name])} floats)", flush=True)
            server.pause()
        first = next(iter(vectors.values()))
        for name, vec in vectors.items():  # same model: the same vector for the same text
            if len(vec) != len(first) or max(abs(a - b) for a, b in zip(vec, first)) > 1e-9:
                raise RuntimeError(f"{name} answers a different embedding: {vec!r} vs {first!r}")
        for conns in args.connections:
            for run in range(args.runs):
                for server in servers:
                    server.resume()  # only the server under test runs; the others are stopped
                    if args.warmup:
                        run_wrk(server.url, conns, args.warmup, lua)
                    workers = 2 if server.name.startswith("ours2") else 1
                    before = server.introspect(workers)
                    cpu0 = server.cpu_seconds()
                    result = parse_wrk(run_wrk(server.url, conns, args.duration, lua))
                    cpu = server.cpu_seconds() - cpu0
                    cell = cells.setdefault((server.name, conns), Cell())
                    cell.runs.append(result)
                    cell.cpu_ms_per_req.append(cpu * 1000 / max(1, result.requests))
                    cell.rss_mb.append(server.rss_mb())
                    after = server.introspect(workers)
                    if before is not None and after is not None:
                        cell.latency.append(after[0])
                        cell.gc_passes.append(after[1][0] - before[1][0])
                        cell.gc_ms.append(after[1][1] - before[1][1])
                    server.pause()
                    print(f"c={conns:<4} run {run + 1} {server.name:<9} {result.rps:8.0f} req/s  "
                          f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  errors {result.errors}  "
                          f"cpu {cell.cpu_ms_per_req[-1] * 1000:.0f} µs/req", flush=True)
    finally:
        for server in servers:
            server.stop()
    names = [s.name for s in servers]
    command = "python benchmarks/bench_servers.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    ours_cmd = "python -m batched_fn.examples.server " + OURS_ARGS + (" " + args.ours_args if args.ours_args else "")
    report = f"""# Server-level peers

One toy model (2 ms + 50 µs per item, GIL released; 8 floats out) behind HTTP:
`POST /embed` `{BODY}` -> `{{"embedding": [...]}}`, batches of up to 32, 5 ms batching delay,
127.0.0.1. wrk {args.duration} s per run after a {args.warmup} s warm-up, the servers interleaved
at each connection count (the others SIGSTOPped meanwhile), median of {args.runs} runs.
Cells: req/s (× mosec's) · p50 / p99 ms (p99 × mosec's).

- Machine: {_machine()}; load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at the end
  (a machine shared with other jobs: read the ratios more than single cells).
- Date: {started:%Y-%m-%d %H:%M} UTC. Command: `{command.strip()}`
- Ours: `{ours_cmd}` (this project's .venv); ours2: the same with `{OURS2_ARGS}` (two HTTP
  worker processes, one model process sharing its batcher); ours-pygc: the same with
  `{OURS_PYGC_ARGS}` (no `gc.freeze()`, Python's young-pass threshold); ours-pysi: the same
  with `{OURS_PYSI_ARGS}` (Python's GIL switch interval instead of the server's 0.5 ms);
  threads: `python -m
  batched_fn.examples.threaded_server {THREADS_ARGS}` with the same flags, on {FT_PY.name} of
  build/venv-ft (free-threaded CPython, GIL off: two HTTP threads, one batcher in-process),
  threadsg: the same with `--http granian`.
- mosec: benchmarks/peer_mosec.py (one worker process, compact JSON out);
  LitServe: benchmarks/peer_litserve.py (one API server process, one inference worker, defaults
  otherwise); both from build/venv-peers.

{render_table(cells, names, args.connections)}

Server CPU (user + system, the whole process tree) per request, median of the runs, and the
largest total RSS of the process tree seen (RSS summed over processes, so shared pages count
once per process):

{render_resources(cells, names, args.connections)}

Where the example server's time goes (its `/stats` `latency` after each run: the last 4096 requests
of each HTTP worker, p50 / p99 ms, median of the runs). `queue`: from the call until the batch's
handler started (the batching delay, a free worker, with `--workers` the trip to the model process);
`batch`: the handler; `deliver`: handler end until the request resumed; `http`: the rest of the
request's time in the app (reading, checking, writing the answer); `server`: all of it. The gap to
wrk's p99 is outside the app: the kernel, uvicorn's parsing and event loop turns, wrk itself. Last
column: the garbage collector's passes during a run and their total milliseconds, summed over the
server's processes (median of the runs).

{render_breakdown(cells, names, args.connections)}

![req/s and p99 against connections](servers.png)
"""
    args.out.write_text(report)
    plot(cells, names, args.connections, args.plot)
    print(report)


if __name__ == "__main__":
    main()
