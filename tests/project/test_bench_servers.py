"""benchmarks/bench_servers.py: wrk output parsing and the table rendering (no server is started)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_servers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_servers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_servers"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_servers"]


WRK_OK = """Running 4s test @ http://127.0.0.1:41234/embed
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.31ms    3.02ms  41.20ms   80.11%
    Req/Sec     2.61k   210.33     3.01k    71.25%
  Latency Distribution
     50%   11.87ms
     75%   13.90ms
     90%   16.02ms
     99%   22.45ms
  20861 requests in 4.00s, 4.10MB read
Requests/sec:   5213.77
Transfer/sec:      1.02MB
"""

WRK_ERRORS = """Running 4s test @ http://127.0.0.1:41234/embed
  1 threads and 1 connections
  Latency Distribution
     50%  812.00us
     75%  901.00us
     90%    1.10ms
     99%    1.20s
  4410 requests in 4.00s, 1.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   1102.50
"""


def test_parse_wrk_reads_throughput_and_percentiles(bench):
    result = bench.parse_wrk(WRK_OK)
    assert result.rps == pytest.approx(5213.77)
    assert result.p50_ms == pytest.approx(11.87)
    assert result.p99_ms == pytest.approx(22.45)
    assert result.requests == 20861
    assert result.errors == 0


def test_parse_wrk_converts_units_and_counts_errors(bench):
    result = bench.parse_wrk(WRK_ERRORS)
    assert result.p50_ms == pytest.approx(0.812)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.errors == 2 + 3 + 7


def test_parse_wrk_rejects_output_without_results(bench):
    with pytest.raises(ValueError, match=re.escape("wrk output lacks Requests/sec or the latency distribution")):
        bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_tables_show_medians_and_ratios_to_mosec(bench):
    def cell(rps_values, p99_values, cpu, rss):
        c = bench.Cell()
        for rps, p99 in zip(rps_values, p99_values):
            c.runs.append(bench.WrkResult(rps=rps, p50_ms=p99 / 2, p99_ms=p99, requests=int(rps * 4)))
        c.cpu_ms_per_req = cpu
        c.rss_mb = rss
        return c

    cells = {("ours", 64): cell([3000, 5000, 4000], [30, 50, 40], [0.2, 0.3, 0.4], [100, 120, 110]),
             ("mosec", 64): cell([2000, 2000, 2000], [20, 20, 20], [0.1, 0.1, 0.1], [300, 310, 305])}
    table = bench.render_table(cells, ["ours", "mosec"], [64, 256])
    lines = table.splitlines()
    assert lines[0] == "| connections | batched_fn example server | mosec 0.9.8 |"
    assert lines[2] == "| 64 | 4.00k (×2.00) · 20.0 / 40.0 (p99 ×2.00) | 2.00k · 10.0 / 20.0 |"
    assert lines[3] == "| 256 | n/a | n/a |"
    resources = bench.render_resources(cells, ["ours", "mosec"], [64])
    assert resources.splitlines()[2] == "| batched_fn example server | 300 | 120 |"
    assert resources.splitlines()[3] == "| mosec 0.9.8 | 100 | 310 |"


def test_bad_arguments_are_named(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--servers", "ours,nginx"])
    assert ("invalid servers value: expected some of ours,ours2,ours-pygc,ours-pysi,ours-nolag,threads,threadsg,"
            "mosec,litserve (got 'ours,nginx')" in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        bench.parse_args(["--connections", "0,16"])
    assert "invalid connections value: expected ints >= 1 (got '0,16')" in capsys.readouterr().err
    args = bench.parse_args(["--servers", "mosec", "--connections", "1,16", "--ours-args", "--workers 2"])
    assert args.servers == ["mosec"] and args.connections == [1, 16] and args.ours_args == "--workers 2"


def test_latency_of_two_workers_merges_weighted_by_their_counts(bench):
    one = {part: {"count": 100, "mean_ms": 1.0, "p50_ms": 1.0, "p99_ms": 4.0} for part in bench.PARTS}
    two = {part: {"count": 300, "mean_ms": 2.0, "p50_ms": 2.0, "p99_ms": 8.0} for part in bench.PARTS}
    merged = bench.merge_latency([one, two])
    assert merged["queue"] == {"count": 400, "mean_ms": 1.75, "p50_ms": 1.75, "p99_ms": 7.0}
    empty = {part: {"count": 0, "mean_ms": 0.0, "p50_ms": 0.0, "p99_ms": 0.0} for part in bench.PARTS}
    assert bench.merge_latency([empty])["http"] == {"count": 0, "mean_ms": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}


def test_breakdown_table_shows_each_part_beside_wrk(bench):
    part = {"count": 10, "mean_ms": 1.0, "p50_ms": 1.0, "p99_ms": 3.0}
    cell = bench.Cell(runs=[bench.parse_wrk(WRK_OK)] * 2, latency=[{p: part for p in bench.PARTS}] * 2,
                      gc_passes=[3, 5], gc_ms=[1.0, 2.0])
    table = bench.render_breakdown({("ours", 64): cell, ("mosec", 64): bench.Cell(runs=[bench.parse_wrk(WRK_OK)])},
                                   ["ours", "mosec"], [64])
    lines = table.splitlines()
    assert lines[0] == ("| server | connections | queue | batch | deliver | http | server | wrk p99 "
                        "| GC passes / ms per run |")
    assert lines[2] == ("| batched_fn example server | 64 | 1.00 / 3.00 | 1.00 / 3.00 | 1.00 / 3.00 | 1.00 / 3.00 "
                        "| 1.00 / 3.00 | 22.4 | 4 / 1.5 |")
    assert len(lines) == 3      # mosec reports no breakdown
