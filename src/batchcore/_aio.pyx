# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""asyncio delivery: finished requests reach their event loop in one wake-up per batch.

The collector and the requests know nothing about event loops; a worker hands
the finished asyncio requests of a batch to each loop's :class:`LoopMailbox`,
which resolves their futures in the loop's own thread.

What guards what: each mailbox's ``items`` and ``scheduled`` are under its
``lock`` (held for a list operation, never while calling the loop);
``_MAILBOXES`` is changed under ``_REGISTRY_LOCK``; the last mailbox looked up
is cached per thread (an event loop runs in one thread), so the cache is
never shared.
"""

cimport cython

import logging as _logging
import threading as _threading
from weakref import WeakKeyDictionary as _WeakKeyDictionary, ref as _weakref


_log = _logging.getLogger("batched_fn")

# The mailbox of each event loop (changed under _REGISTRY_LOCK), and per
# thread the last (loop ref, mailbox) pair looked up.
_MAILBOXES = _WeakKeyDictionary()
cdef cython.pymutex _REGISTRY_LOCK
_last_mailbox = _threading.local()


cdef LoopMailbox mailbox_for(object loop):
    """The mailbox through which workers hand results to loop (one per loop)."""
    cdef tuple pair = getattr(_last_mailbox, "pair", None)
    if pair is not None and pair[0]() is loop:
        return <LoopMailbox>pair[1]
    with _REGISTRY_LOCK:
        mailbox = _MAILBOXES.get(loop)
        if mailbox is None:
            mailbox = LoopMailbox(loop)
            _MAILBOXES[loop] = mailbox
    _last_mailbox.pair = (_weakref(loop), mailbox)
    return <LoopMailbox>mailbox


@cython.final
cdef class LoopMailbox:
    """Finished asyncio requests of one event loop, resolved in that loop's thread.

    A worker posts a batch's requests and wakes the loop with
    ``call_soon_threadsafe`` only if no drain is pending already: at most one
    wake-up per batch, and none while the loop has not caught up.  ``lock``
    guards ``items`` and ``scheduled``.
    """

    def __cinit__(self, object loop):
        self.loop_ref = _weakref(loop)
        self.items = []

    @property
    def loop(self):
        """The event loop, or None once it is gone."""
        return self.loop_ref()

    cdef void post(self, list reqs) except *:
        with self.lock:
            self.items.extend(reqs)
            if self.scheduled:
                return
            self.scheduled = True
        loop = self.loop_ref()
        try:
            if loop is None:
                raise RuntimeError("event loop is gone")
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:       # the loop is closed: nobody is left to wait
            with self.lock:
                self.scheduled = False
                self.items = []

    def drain(self) -> None:
        """Runs in the loop's thread: set each posted request's future."""
        # Clear the flag before taking the list: a post that lands in between
        # schedules another drain instead of being stranded.
        with self.lock:
            self.scheduled = False
            items = self.items
            self.items = []
        _resolve(items)


cdef void _resolve(list reqs) except *:
    cdef Request req
    for req in reqs:
        fut = req.waiter
        req.waiter = req.loop = None
        if fut is None or fut.done():
            continue
        try:
            if req.error is None:
                fut.set_result(req.result)
            elif isinstance(req.error, (StopIteration, StopAsyncIteration)):
                # asyncio refuses these as a future's exception (TypeError up
                # to 3.12, a RuntimeError of its own after): hand it over wrapped.
                raise TypeError
            else:
                fut.set_exception(req.error)
        except TypeError:
            # asyncio refuses StopIteration (and StopAsyncIteration) as a
            # future's exception: hand it over wrapped.
            fut.set_exception(wrapped_error(req.error))
        except Exception:
            # One broken future must not strand the rest of the list.
            _log.exception("batched_fn: resolving an asyncio future failed")
        req.result = req.error = req.error_tb = None
