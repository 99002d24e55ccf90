"""Goodput over HTTP under overload: the example server and mosec, open-loop load at 0.5x to 3x capacity.

    python benchmarks/bench_server_slo.py [--install-peers] [--seconds 3] [--servers ours,mosec]

The toy model and the flags of benchmarks/bench_servers.py (2 ms + 50 µs per item, batches of
up to 32, 5 ms batching delay, ``POST /embed``), each server given a 50 ms budget per request:
ours with ``--timeout 0.05`` (it answers 503 + Retry-After when it sheds, 504 when the time is
up), mosec with ``--timeout 50`` (ms; 408 when the time is up) and ``--capacity 256`` (its queue,
429 beyond: about what it serves in 50 ms at its capacity).  One server runs at a time.

For each server: its capacity first, closed loop (wrk, 64 connections, the rate of 200
answers), then open-loop Poisson load from benchmarks/c/openloop.c (build/openloop) at 0.5x,
0.9x, 1.2x, 1.5x and 3x of THAT capacity.  Goodput: answers with status 200 within the SLO
(50 ms) of their SCHEDULED send time, per second.  Then the same loads with a fifth of the
requests at ``"priority": 1`` (mosec reads only "text": for it the mix is a control).  The
generator's own CPU time is recorded in each cell: on a 2-core machine it competes with the
server.  Writes ``--out`` (markdown) and ``--plot`` (goodput and p99 against offered load).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
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
import bench_servers  # noqa: E402
from bench_servers import BODY, LABELS, LUA, PEER_PY, Server, install_peers, parse_wrk, run_wrk  # noqa: E402

OPENLOOP = ROOT / "build" / "openloop"
SERVERS = ("ours", "ours-nolag", "mosec")
LOADS = (0.5, 0.9, 1.2, 1.5, 3.0)
SLO_MS = 50.0
HIGH_SHARE = 0.2
BODY_HIGH = BODY[:-1] + ', "priority": 1}'
#: each server's own 50 ms budget
OURS_SLO_ARGS = "--timeout 0.05"
MOSEC_SLO_ARGS = "--timeout 50 --capacity 256"
#: the generator's connection pool: a request due while all are busy is not sent ("blocked")
CONNECTIONS = 2048
CAPACITY_CONNECTIONS = 64
#: other jobs' CPU (cores) above which a cell waits before it starts, and is run once more after
OTHER_LIMIT = 0.2


@dataclass
class Cell:
    """One server at one load: openloop's summary and the server's CPU seconds meanwhile."""

    server: str
    load: float
    mix: bool
    summary: dict = field(default_factory=dict)
    server_cpu_s: float = 0.0
    #: the machine's busy CPU seconds during the cell less the server's and openloop's (other work)
    other_cpu_s: float = 0.0
    #: the server stopped answering during the cell (it was restarted for the next one)
    crashed: bool = False
    #: every round's goodput (req/s) of this server and load, when there were several
    round_goodputs: list[float] = field(default_factory=list)
    #: how many of those rounds the server stopped answering in
    crashed_rounds: int = 0

    def goodput_text(self) -> str:
        """Goodput req/s, with the range over the rounds when there were several."""
        text = f"{self.summary['goodput_rps']:.0f}"
        if len(self.round_goodputs) > 1:
            text += f" ({min(self.round_goodputs):.0f}–{max(self.round_goodputs):.0f})"
        if self.crashed_rounds:
            text += f" [crashed in {self.crashed_rounds} of {max(1, len(self.round_goodputs))}]"
        return text

    def count(self, status: str) -> int:
        """Answers with this HTTP status."""
        return int(self.summary["status"].get(status, 0))

    def other(self) -> int:
        """Answers with any status but 200, 408, 429, 503 and 504."""
        return sum(v for k, v in self.summary["status"].items() if k not in ("200", "408", "429", "503", "504"))

    def in_slo(self, cls: int) -> float:
        """The share of one class's requests answered 200 within the SLO."""
        c = self.summary["classes"][cls]
        return c["good"] / c["scheduled"] if c["scheduled"] else float("nan")

    def generator_cpu(self) -> float:
        """openloop's CPU seconds (user + system) per second of its run."""
        s = self.summary
        return (s["cpu_user_s"] + s["cpu_sys_s"]) / s["wall_s"]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render_table(cells: Sequence[Cell], capacity: dict[str, float]) -> str:
    """One row per server and load: offered, goodput, p50/p99 of the 200s, every outcome's count."""
    lines = ["| server | load | offered req/s | goodput req/s | goodput / capacity | p50 / p99 ms (200s) | 200 | 429 "
             "| 503 | 504 | 408 | other | conn errors | blocked | unanswered | connections opened | send lag p99 ms "
             "| openloop CPU | server CPU | other CPU |",
             "|" + "---|" * 20]
    for c in cells:
        s = c.summary
        lines.append(" | ".join([
            f"| {LABELS.get(c.server, c.server)}", f"{c.load:g}x", f"{s['offered_rps']:.0f}", c.goodput_text(),
            f"{s['goodput_rps'] / capacity[c.server]:.2f}", f"{_ms(s['p50_ms'])} / {_ms(s['p99_ms'])}",
            str(c.count("200")), str(c.count("429")), str(c.count("503")), str(c.count("504")), str(c.count("408")),
            str(c.other()), str(s["conn_errors"]) + (" (crashed)" if c.crashed else ""), str(s["blocked"]),
            str(s["unanswered"]), str(s["connections_opened"]), _ms(s["send_lag_p99_ms"]), f"{c.generator_cpu():.0%}",
            f"{c.server_cpu_s / s['wall_s']:.0%}", f"{c.other_cpu_s / s['wall_s']:.0%}"]) + " |")
    return "\n".join(lines)


def render_mix(cells: Sequence[Cell], capacity: dict[str, float]) -> str:
    """One row per server and load of the two-class mix: goodput and each class's share within the SLO."""
    lines = ["| server | load | offered req/s | goodput req/s | goodput / capacity | high (priority 1) in SLO "
             "| low in SLO | p99 ms (200s) | 503 / 504 / 429 / 408 |", "|" + "---|" * 9]
    for c in cells:
        s = c.summary
        lines.append(" | ".join([
            f"| {LABELS.get(c.server, c.server)}", f"{c.load:g}x", f"{s['offered_rps']:.0f}", c.goodput_text(),
            f"{s['goodput_rps'] / capacity[c.server]:.2f}", f"{c.in_slo(1):.1%}", f"{c.in_slo(0):.1%}",
            _ms(s["p99_ms"]), f"{c.count('503')} / {c.count('504')} / {c.count('429')} / {c.count('408')}"
            + (f" · {s['conn_errors']} connection errors (crashed)" if c.crashed else "")]) + " |")
    return "\n".join(lines)


def plot(cells: Sequence[Cell], capacity: dict[str, float], out: Path) -> None:
    """Goodput and p99 of the 200s against offered load (req/s), one line per server (single class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in dict.fromkeys(c.server for c in cells):
        row = [c for c in cells if c.server == server and not c.mix]
        xs = [c.summary["offered_rps"] for c in row]
        label = LABELS.get(server, server)
        ys = [c.summary["goodput_rps"] for c in row]
        spread = [[y - min(c.round_goodputs or [y]) for c, y in zip(row, ys)],
                  [max(c.round_goodputs or [y]) - y for c, y in zip(row, ys)]]
        line = ax1.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=label).lines[0]
        ax1.axhline(capacity[server], color=line.get_color(), ls=":", lw=1)
        ax2.plot(xs, [c.summary["p99_ms"] or float("nan") for c in row], marker="o", label=label)
    top = max(c.summary["offered_rps"] for c in cells)
    ax1.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="goodput = offered")
    ax2.axhline(SLO_MS, color="red", lw=0.8, ls="--", label=f"SLO {SLO_MS:g} ms")
    ax1.set_ylabel("goodput, req/s (200 within SLO)")
    ax2.set_ylabel("p99 of 200 answers, ms (from scheduled send)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("offered load, req/s (open loop, Poisson)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("toy model over HTTP, SLO 50 ms; loads 0.5x-3x of each server's capacity (dotted); "
                 "bars: range over the rounds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# --- everything below starts processes -------------------------------------------------------


def build_openloop() -> None:
    """make build/openloop (rebuilt when its source changed)."""
    subprocess.run(["make", "-s", "build/openloop"], cwd=ROOT, check=True, timeout=120)


def run_openloop(url: str, rate: float, seconds: float, warmup: float, seed: int, mix: bool,
                 connections: int = CONNECTIONS) -> dict:
    """One bounded open-loop run; openloop's JSON summary."""
    cmd = [str(OPENLOOP), "--url", url, "--body", BODY, "--rate", f"{rate:.1f}", "--duration", str(seconds),
           "--warmup", str(warmup), "--connections", str(connections), "--seed", str(seed),
           "--slo-ms", str(SLO_MS), "--drain-ms", "1000"]
    if mix:
        cmd += ["--body2", BODY_HIGH, "--share2", str(HIGH_SHARE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 30, check=True)
    return json.loads(proc.stdout)


def measure_capacity(server: Server, seconds: int, lua: Path) -> tuple[float, str]:
    """Closed loop: wrk at 64 connections; the rate of 200 answers, and a line saying what wrk saw."""
    run_wrk(server.url, CAPACITY_CONNECTIONS, 1, lua)   # warm-up
    result = parse_wrk(run_wrk(server.url, CAPACITY_CONNECTIONS, seconds, lua))
    ok_share = 1 - result.errors / max(1, result.requests)
    note = (f"{result.rps:.0f} req/s, {result.errors} of {result.requests} not 200, "
            f"p50 {result.p50_ms:.1f} / p99 {result.p99_ms:.1f} ms")
    return result.rps * ok_share, note


def run_cell(server: Server, load: float, mix: bool, capacity: float, args: argparse.Namespace) -> Cell:
    """One open-loop run at load x capacity once the machine is quiet; the CPU seconds of each party."""
    cell = Cell(server.name, load, mix)
    _wait_quiet(server)
    cpu0, busy0 = server.cpu_seconds(), _busy_cpu_seconds()
    cell.summary = run_openloop(server.url, load * capacity, args.seconds, args.warmup, args.seed, mix,
                                args.connections)
    cell.server_cpu_s = server.cpu_seconds() - cpu0
    gen = cell.summary["cpu_user_s"] + cell.summary["cpu_sys_s"]
    cell.other_cpu_s = max(0.0, _busy_cpu_seconds() - busy0 - cell.server_cpu_s - gen)
    s = cell.summary
    print(f"{server.name:<6} {'mix' if mix else '   '} {load:>4g}x offered {s['offered_rps']:7.0f} goodput "
          f"{s['goodput_rps']:7.0f} p99 {_ms(s['p99_ms']):>7} ms status {s['status']} blocked {s['blocked']} "
          f"connerr {s['conn_errors']} high-in-SLO {cell.in_slo(1):.1%} openloop cpu {cell.generator_cpu():.0%} "
          f"other cpu {cell.other_cpu_s / s['wall_s']:.0%}", flush=True)
    return cell


def median_cell(runs: Sequence[Cell]) -> Cell:
    """The run with the median goodput (the lower middle one of an even count), whole, with every round's goodput."""
    cell = sorted(runs, key=lambda c: c.summary["goodput_rps"])[(len(runs) - 1) // 2]
    cell.round_goodputs = [c.summary["goodput_rps"] for c in runs]
    cell.crashed_rounds = sum(c.crashed for c in runs)
    return cell


def _wait_quiet(server: Server, max_wait_s: float = 60.0) -> None:
    """Wait (1 s at least, max_wait_s at most) until other jobs use under OTHER_LIMIT of a core."""
    deadline = time.monotonic() + max_wait_s
    while True:
        cpu0, busy0 = server.cpu_seconds(), _busy_cpu_seconds()
        time.sleep(1.0)
        other = _busy_cpu_seconds() - busy0 - (server.cpu_seconds() - cpu0)
        if other < OTHER_LIMIT or time.monotonic() > deadline:
            return


def _shown(arg: str, i: int, port: int) -> str:
    """A server's argument as the report shows it: python, paths from the repository, the port as PORT."""
    if i == 0:
        return "python"
    if arg == str(port):
        return "PORT"
    return arg.replace(str(ROOT) + os.sep, "")


def _server(name: str, logdir: Path) -> Server:
    """The server with its 50 ms budget (not started); mosec logs errors only (else a line per 429)."""
    server = Server(name, OURS_SLO_ARGS if name.startswith("ours") else "", logdir)
    if name == "mosec":
        cmd = server.cmd
        cmd[cmd.index("--log-level") + 1] = "error"
        cmd += shlex.split(MOSEC_SLO_ARGS)
    return server


def _answers(url: str) -> bool:
    """Whether the server still answers one request (any HTTP status counts) within a few seconds."""
    for _ in range(3):
        try:
            req = urllib.request.Request(url, BODY.encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    return False


def _why(log: Path) -> str:
    """The first line of a crashed server's log that says why (a panic, a traceback's last line)."""
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if "panicked at" in line:
            return line.strip()
    errors = [line for line in lines if "Error" in line or "ERROR" in line]
    return (errors[0] if errors else "no reason in its log").strip()[:300]


def _busy_cpu_seconds() -> float:
    """The whole machine's non-idle CPU seconds so far."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="some of ours,ours-nolag,mosec (run in this order; ours-nolag: ours with "
                             "--loop-lag-factor 0)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per open-loop cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--capacity-seconds", type=int, default=3, help="seconds of the wrk capacity run")
    parser.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS), help="multiples of capacity")
    parser.add_argument("--no-mix", action="store_true", help="skip the two-class (priority) cells")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every cell; the table shows the median "
                        "goodput's run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="openloop's pool: a request due while all are busy is not sent (blocked)")
    parser.add_argument("--install-peers", action="store_true", help="create/refresh build/venv-peers first")
    parser.add_argument("--out", type=Path, default=HERE / "results_server_slo.md")
    parser.add_argument("--plot", type=Path, default=HERE / "server_slo.png")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or any(s not in SERVERS for s in args.servers):
        parser.error(f"invalid servers value: expected some of {','.join(SERVERS)}")
    try:
        args.loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        parser.error(f"invalid loads value: expected numbers like 0.5,1.5 (got {args.loads!r})")
    if not args.loads or min(args.loads) <= 0 or max(args.loads) > 5:
        parser.error("invalid loads value: expected multiples of capacity in (0, 5]")
    if not (0 < args.seconds <= 20) or not (0 <= args.warmup <= 5) or not (1 <= args.capacity_seconds <= 10):
        parser.error("expected 0 < --seconds <= 20, 0 <= --warmup <= 5, 1 <= --capacity-seconds <= 10")
    if not (1 <= args.rounds <= 5):
        parser.error(f"invalid rounds value: expected 1..5 (got {args.rounds})")
    if not (1 <= args.connections <= 16384):
        parser.error(f"invalid connections value: expected 1..16384 (got {args.connections})")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Each server in turn: start, capacity, the open-loop cells, stop; then the report and the plot."""
    args = parse_args(argv)
    if args.install_peers:
        install_peers()
    if "mosec" in args.servers and not PEER_PY.exists():
        sys.exit(f"no {PEER_PY}: run with --install-peers")
    build_openloop()
    logdir = Path(tempfile.mkdtemp(prefix="bench-server-slo-"))
    lua = logdir / "post.lua"
    lua.write_text(LUA)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = os.getloadavg()
    capacity: dict[str, float] = {}
    notes: dict[str, str] = {}
    commands: dict[str, str] = {}
    cells: list[Cell] = []
    crashes: list[str] = []
    reruns: list[str] = []
    for name in args.servers:
        server = _server(name, logdir)
        commands[name] = " ".join(shlex.quote(_shown(a, i, server.port)) for i, a in enumerate(server.cmd))
        runs: dict[tuple[float, bool], list[Cell]] = {}
        try:
            server.start()
            _wait_quiet(server)
            capacity[name], notes[name] = measure_capacity(server, args.capacity_seconds, lua)
            print(f"{name}: capacity {capacity[name]:.0f} req/s ({notes[name]})", flush=True)
            for _ in range(args.rounds):
                for mix in (False, True) if not args.no_mix else (False,):
                    for load in args.loads:
                        cell = run_cell(server, load, mix, capacity[name], args)
                        if cell.other_cpu_s / cell.summary["wall_s"] > OTHER_LIMIT:   # other jobs ran: once more
                            reruns.append(f"{name} {load:g}x{' mix' if mix else ''} "
                                          f"({cell.other_cpu_s / cell.summary['wall_s']:.0%})")
                            cell = run_cell(server, load, mix, capacity[name], args)
                        runs.setdefault((load, mix), []).append(cell)
                        if not _answers(server.url):    # it died: keep its log, note why, start a fresh one
                            cell.crashed = True
                            server.stop()
                            kept = logdir / f"{name}-crash{len(crashes) + 1}.log"
                            (logdir / f"{name}.log").rename(kept)
                            crashes.append(f"{LABELS[name]} stopped answering during the {load:g}x"
                                           f"{' two-class' if mix else ''} cell: {_why(kept)} (log: {kept})")
                            print(crashes[-1], flush=True)
                            server = _server(name, logdir)
                            server.start()
        finally:
            server.stop()
        cells.extend(median_cell(runs[key]) for key in sorted(runs, key=lambda k: (k[1], k[0])))
    single = [c for c in cells if not c.mix]
    mixed = [c for c in cells if c.mix]
    command = "python benchmarks/bench_server_slo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_at_end = os.getloadavg()
    report = f"""# Goodput over HTTP under overload: the example server and mosec

The toy model of benchmarks/bench_servers.py (2 ms + 50 µs per item, GIL released, batches of up to
32, 5 ms batching delay) behind `POST /embed` `{BODY}`, 127.0.0.1, one server at a time.
SLO {SLO_MS:g} ms, counted from each request's **scheduled** send time.

- Machine: {bench_servers._machine()}; load average (1, 5, 15 min)
  {" / ".join(f"{x:.2f}" for x in load_at_start)} at start, {" / ".join(f"{x:.2f}" for x in load_at_end)} at the end
  (a machine shared with other work; the generator shares its 2 cores with the server).
- Date: {started:%Y-%m-%d %H:%M} UTC. Command: `{command.strip()}`
- Servers: {"; ".join(f"`{cmd}`" for cmd in commands.values())}. Each has a 50 ms budget of its own: ours
  `--timeout 0.05` (503 + Retry-After when it sheds a request its estimate says cannot finish in time, 504 at
  the deadline), mosec `--timeout 50` (ms, 408 at the deadline) and `--capacity 256` (its queue; 429 beyond:
  about what it serves in 50 ms at its capacity).
- Capacity, closed loop (wrk, {CAPACITY_CONNECTIONS} connections, {args.capacity_seconds} s after 1 s of
  warm-up, the rate of 200 answers): {"; ".join(f"{LABELS[n]} **{capacity[n]:.0f} req/s** ({notes[n]})"
                                        for n in capacity)}.
- Load: benchmarks/c/openloop.c (build/openloop; C, one thread, epoll, keep-alive): Poisson arrivals drawn up
  front (seed {args.seed}), {args.warmup:g} s of warm-up then {args.seconds:g} s measured per cell; a request due
  while all {args.connections} connections are busy is not sent (*blocked*), never queued in the client.
  *goodput*: 200 answers within the SLO of their scheduled time, per second (with several rounds, the range
  over them in brackets); *p50 / p99*: of the 200
  answers, from the scheduled time; *unanswered*: no answer 1 s after the last send; *send lag p99*: how late
  the generator sent; *openloop CPU*, *server CPU*: CPU seconds per second of the cell (the generator's
  from getrusage, the server's whole process tree from psutil), out of 2 cores; *other CPU*: the rest of the
  machine's busy time meanwhile (other jobs on this shared machine: the higher, the less the cell is worth).
  Each cell waits (up to 60 s) until other jobs use under {OTHER_LIMIT:g} of a core; a cell during which they
  used more is run once more and the second run kept ({"rerun: " + ", ".join(reruns) if reruns else "none was"}).
  {args.rounds} round(s); with more than one, each row is the run with the median goodput.
- After each cell one request checks that the server still answers; one that does not is restarted for the
  next cell and the cell is marked *(crashed)*. {"Crashes: " + "; ".join(crashes) if crashes else "None crashed."}

{render_table(single, capacity)}

Two classes: a fifth of the requests with `"priority": 1` in the body, the rest at 0 (mosec reads only
`"text"`, so for it this is a control: both classes are served alike). *in SLO*: the share of the class's
requests answered 200 within the SLO.

{render_mix(mixed, capacity) if mixed else "(not run: --no-mix)"}

![goodput and p99 against offered load](server_slo.png)
"""
    args.out.write_text(report)
    plot(cells, capacity, args.plot)
    print(report)


if __name__ == "__main__":
    main()
