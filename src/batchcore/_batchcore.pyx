# cython: language_level=3
"""The compiled core's front: the names the Python layer uses, from the modules below.

The core is built in floors, each importing only from those under it:

    _errors      exceptions, Failed, and the text of every message
    _request     one call, its outcome, a blocking caller's wait
    _aio         asyncio delivery (one mailbox per event loop)
    _delivery    completing requests, waking their callers
    _deadlines   the one timer where request deadlines fire
    _admission   the producer side: push, overflow policies, withdrawal
    _collector   the consumer side: collect, claim, deliver (Channel)

This module depends on all of them and nothing depends on it.

Free threading: every module of the core declares it (setup.py's
``freethreading_compatible``) and says in its docstring what guards its
shared state; nothing relies on a GIL.
"""

from debug cimport BATCHCORE_FLAVOUR
from park cimport bc_now_ns, bc_set_timer_slack

from batched_fn._admission import OnFull
from batched_fn._aio import LoopMailbox, get_mailbox
from batched_fn._collector import Channel, REASONS
from batched_fn._request import Request, debug_counters

__all__ = ["Channel", "OnFull", "Request", "LoopMailbox", "REASONS", "BUILD_FLAVOUR",
           "debug_counters", "get_mailbox", "monotonic_ns", "set_timer_slack"]

#: how this extension was built: "release", "debug", "asan" or "tsan"
BUILD_FLAVOUR = (<bytes>BATCHCORE_FLAVOUR).decode("ascii")


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock of every arrival time and deadline."""
    return bc_now_ns()


def set_timer_slack(unsigned long ns) -> None:
    """Ask the kernel to wake the calling thread's timed waits within ``ns``."""
    bc_set_timer_slack(ns)
