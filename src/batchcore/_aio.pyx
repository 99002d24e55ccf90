# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""asyncio delivery: finished requests reach their event loop in one wake-up per batch.

The collector and the requests know nothing about event loops; a worker hands
the finished asyncio requests of a batch to each loop's :class:`LoopMailbox`,
which resolves their futures in the loop's own thread.
"""

cimport cython

import logging as _logging
from weakref import WeakKeyDictionary as _WeakKeyDictionary, ref as _weakref


_log = _logging.getLogger("batched_fn")

# The mailbox of each event loop, and the last (loop ref, mailbox) pair looked
# up: one tuple, so a reader in another thread never sees half an update.
_MAILBOXES = _WeakKeyDictionary()
cdef tuple _last_mailbox = (None, None)


cdef LoopMailbox mailbox_for(object loop):
    """The mailbox through which workers hand results to loop (one per loop)."""
    global _last_mailbox
    cdef tuple pair = _last_mailbox
    if pair[0] is not None and pair[0]() is loop:
        return <LoopMailbox>pair[1]
    mailbox = _MAILBOXES.get(loop)
    if mailbox is None:
        mailbox = _MAILBOXES.setdefault(loop, LoopMailbox(loop))
    _last_mailbox = (_weakref(loop), mailbox)
    return <LoopMailbox>mailbox


@cython.final
cdef class LoopMailbox:
    """Finished asyncio requests of one event loop, resolved in that loop's thread.

    A worker posts a batch's requests and wakes the loop with
    ``call_soon_threadsafe`` only if no drain is pending already: at most one
    wake-up per batch, and none while the loop has not caught up.  Both sides
    run with the GIL held, which guards ``items`` and ``scheduled``.
    """

    def __cinit__(self, object loop):
        self.loop_ref = _weakref(loop)
        self.items = []

    @property
    def loop(self):
        """The event loop, or None once it is gone."""
        return self.loop_ref()

    cdef void post(self, list reqs) except *:
        self.items.extend(reqs)
        if self.scheduled:
            return
        loop = self.loop_ref()
        self.scheduled = True
        try:
            if loop is None:
                raise RuntimeError("event loop is gone")
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:       # the loop is closed: nobody is left to wait
            self.scheduled = False
            self.items = []

    def drain(self) -> None:
        """Runs in the loop's thread: set each posted request's future."""
        # Clear the flag before taking the list: a post that lands in between
        # schedules another drain instead of being stranded.
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
