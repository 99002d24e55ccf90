"""The line a server of the examples prints once it accepts requests, and the pattern that finds it.

The example server prints it; the demo, the tests and the benchmarks that start a server as a
child process wait for it on the child's output.
"""

from __future__ import annotations

import re

#: finds the line, its group 1 is the URL to send requests to
READY = re.compile(r"ready on (http://[\w.\-\[\]:]+:\d+)")


def ready_line(server: str, url: str, details: str = "") -> str:
    """``"<server> ready on <url> <details>"``: the line :data:`READY` finds."""
    return f"{server} ready on {url}" + (f" {details}" if details else "")
