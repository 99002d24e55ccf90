"""benchmarks/bench_server_slo.py: the tables from openloop summaries and its arguments (no server is started)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))   # it imports bench_servers from beside it
    spec = importlib.util.spec_from_file_location("bench_server_slo", BENCH / "bench_server_slo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_server_slo"] = module  # dataclasses look the module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_server_slo"]
        sys.modules.pop("bench_servers", None)
        sys.path.remove(str(BENCH))


SUMMARY = {"offered_rps": 3000.0, "goodput_rps": 2000.0, "p50_ms": 12.5, "p99_ms": 48.0, "conn_errors": 1,
           "blocked": 2, "unanswered": 0, "connections_opened": 300, "send_lag_p99_ms": 0.4,
           "status": {"200": 7000, "503": 1500, "504": 90, "500": 3},
           "classes": [{"scheduled": 8000, "ok": 5600, "good": 4800}, {"scheduled": 2000, "ok": 1400, "good": 1200}],
           "cpu_user_s": 0.3, "cpu_sys_s": 0.5, "wall_s": 4.0}


def test_tables_show_goodput_against_capacity_and_every_outcome(bench):
    cell = bench.Cell("ours", 1.5, False, SUMMARY, server_cpu_s=6.0, other_cpu_s=0.4, crashed=True)
    lines = bench.render_table([cell], {"ours": 2500.0}).splitlines()
    assert lines[2] == ("| batched_fn example server | 1.5x | 3000 | 2000 | 0.80 | 12.5 / 48.0 | 7000 | 0 | 1500 | 90 "
                        "| 0 | 3 | 1 (crashed) | 2 | 0 | 300 | 0.4 | 20% | 150% | 10% |")
    mix = bench.render_mix([bench.Cell("ours", 1.5, True, SUMMARY)], {"ours": 2500.0}).splitlines()
    assert mix[2] == ("| batched_fn example server | 1.5x | 3000 | 2000 | 0.80 | 60.0% | 60.0% | 48.0 "
                      "| 1500 / 90 / 0 / 0 |")


def test_bad_arguments_are_named(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--servers", "ours,nginx"])
    assert "invalid servers value: expected some of ours,ours-nolag,mosec" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--loads", "0.5,x"])
    assert "invalid loads value: expected numbers like 0.5,1.5 (got '0.5,x')" in capsys.readouterr().err
    args = bench.parse_args(["--servers", "mosec", "--loads", "1.5"])
    assert args.servers == ["mosec"] and args.loads == [1.5]


def test_a_crashed_servers_log_says_why(bench, tmp_path):
    log = tmp_path / "mosec.log"
    log.write_text("starting\n\nthread 'tokio-rt-worker' (6447) panicked at src/tasks.rs:307:33:\nunwrap\n")
    assert bench._why(log) == "thread 'tokio-rt-worker' (6447) panicked at src/tasks.rs:307:33:"
    log.write_text("Traceback\nRuntimeError: boom\n")
    assert bench._why(log) == "RuntimeError: boom"


def test_several_rounds_keep_the_median_run_and_show_the_range(bench):
    runs = [bench.Cell("mosec", 3.0, False, dict(SUMMARY, goodput_rps=g)) for g in (900.0, 100.0, 2500.0)]
    runs[1].crashed = True
    cell = bench.median_cell(runs)
    assert cell is runs[0] and cell.round_goodputs == [900.0, 100.0, 2500.0] and cell.crashed_rounds == 1
    assert bench.render_table([cell], {"mosec": 1000.0}).splitlines()[2].startswith(
        "| mosec 0.9.8 | 3x | 3000 | 900 (100–2500) [crashed in 1 of 3] | 0.90 |")
