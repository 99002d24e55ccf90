# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core of batched_fn: one extension module, built from parts.

Each part is a file cut by job and included here, in floor order: a part
uses only names of the parts included before it (tests/test_sourcecode.py
checks it).  Their declarations come in the same order from python/batched_fn/_batchcore.pxd.

    _errors      exceptions, Failed, and the text of every message
    _request     one call, its outcome, a blocking caller's wait
    _aio         asyncio delivery (one mailbox per event loop)
    _delivery    completing requests, waking their callers
    _deadlines   the one timer where request deadlines fire
    _scheduler   the order batches take queued requests in (priority, deadline, arrival)
    _keys        keyed batches: per-key scheduler queues, which key goes next
    _admission   the producer side: push, overflow policies, withdrawal
    _collector   the consumer side: collect, claim, deliver (Channel)
    _delay       the adaptive delay policy alone, driven by tests with a fake clock
    _shm         a shared-memory ring between two processes (benchmarks)

One module, so a call into another part is a direct C call (no function
pointers between extension modules) and the parts share one set of compiler
directives (the line above).

Free threading: the module declares it (``freethreading_compatible`` in
setup.py), and each part says in its docstring what guards its shared state;
nothing relies on a GIL.
"""

include "_errors.pyx"
include "_request.pyx"
include "_aio.pyx"
include "_delivery.pyx"
include "_deadlines.pyx"
include "_scheduler.pyx"
include "_keys.pyx"
include "_admission.pyx"
include "_collector.pyx"
include "_delay.pyx"
include "_shm.pyx"

from debug cimport BATCHCORE_FLAVOUR
from park cimport BC_PARK_IMPL, bc_set_timer_slack

#: how this extension was built: "release", "debug", "asan" or "tsan"
BUILD_FLAVOUR = (<bytes>BATCHCORE_FLAVOUR).decode("ascii")
#: how a thread sleeps until woken (park.h): "futex" (Linux) or "pthread" (the portable fallback)
PARK_IMPL = (<bytes>BC_PARK_IMPL).decode("ascii")


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock of every arrival time and deadline."""
    return bc_now_ns()


def set_timer_slack(unsigned long ns) -> None:
    """Ask the kernel to wake the calling thread's timed waits within ``ns``."""
    bc_set_timer_slack(ns)
