"""The example servers' "ready" line and the pattern the demo, tests and benchmarks wait for."""

from batched_fn.examples.ready import READY, ready_line


def test_the_pattern_finds_the_url_of_the_line():
    line = ready_line("batched_fn server", "http://127.0.0.1:8123", "(model=toy, workers=1)")
    assert line == "batched_fn server ready on http://127.0.0.1:8123 (model=toy, workers=1)"
    match = READY.search(line)
    assert match is not None and match.group(1) == "http://127.0.0.1:8123"
    assert READY.search(ready_line("minimal app", "http://localhost:80")).group(1) == "http://localhost:80"


def test_the_pattern_ignores_other_lines():
    assert READY.search("INFO:     Uvicorn running on http://127.0.0.1:8000") is None
    assert READY.search("batched_fn server ready on") is None
