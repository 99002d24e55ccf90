# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""Completion: store each request's outcome and wake its caller, whatever kind it is.

Blocking callers are woken one by one, each on its own request, after every
outcome of the batch is stored and with the GIL released; concurrent futures
are set in the worker; asyncio callers get one wake-up per loop per batch
through their :class:`_aio.LoopMailbox`.

Shared state: none of its own.  A request here is TAKEN (or CANCELLED by a
deadline), so the thread delivering it is its only writer; the outcome is
published by the store of DONE (release or seq_cst) that its caller acquires.
The counters passed in are atomics, added to before any caller wakes.
"""

from libc.stdlib cimport free, malloc

from atomics cimport (
    bc_atomic_u32, bc_atomic_u64, bc_fetch_add_u64_relaxed, bc_load_u32_seq_cst, bc_store_u32_release, bc_store_u32_seq_cst,
)
from park cimport bc_unpark_one


cdef void finish_one(Request req, object result, object error, object tb, bint keep_input=False) except *:
    """Store one request's outcome and wake its caller (GIL held); keep_input: see store()."""
    store(req, result, error, tb, keep_input)
    if req.kind == KIND_FUTURE:
        _complete_future(req)
    elif req.kind == KIND_ASYNC:
        bc_store_u32_release(&req.state, DONE)
        if _abandoned(req):
            return
        (<LoopMailbox>req.loop).post([req])
    else:
        # seq_cst: the outcome above is visible to whoever acquires DONE, and
        # the store is ordered before our read of parked (Dekker).
        bc_store_u32_seq_cst(&req.state, DONE)
        if bc_load_u32_seq_cst(&req.parked):
            bc_unpark_one(&req.state)


cdef int deliver(list batch, object outputs, object error,
                 bc_atomic_u64 *completed, bc_atomic_u64 *failed) except -1:
    """Give each request of batch its outcome and wake its caller.

    outputs: a sequence as long as batch (output i to request i; a ``Failed``
    entry fails only its own caller), or None when error is the exception for
    the whole batch (each caller after the first gets its own copy of it).
    Every outcome is stored and counted (*completed, *failed) before the
    first caller wakes, so a caller that returns sees counters that add up.
    """
    cdef Py_ssize_t i, n = len(batch), nwake = 0, ncompleted = 0, nfailed = 0
    cdef Request req
    cdef object out, err, tb = None
    cdef LoopMailbox mailbox = None
    cdef list pending = None
    cdef dict more_loops = None
    if error is not None:
        tb = error.__traceback__
    for i in range(n):
        req = <Request>batch[i]
        if error is None:
            out = outputs[i]
            if isinstance(out, Failed):
                err = (<Failed>out).error
                nfailed += 1
                store(req, None, err, err.__traceback__)
            else:
                ncompleted += 1
                store(req, out, None, None)
        else:
            nfailed += 1
            store(req, None, error if i == 0 else caller_copy(error), tb)
    # Counted before the first caller wakes (the DONE stores below publish them).
    if ncompleted:
        bc_fetch_add_u64_relaxed(completed, ncompleted)
    if nfailed:
        bc_fetch_add_u64_relaxed(failed, nfailed)
    cdef bc_atomic_u32 **wake = <bc_atomic_u32 **>malloc(<size_t>n * sizeof(bc_atomic_u32 *) + 1)
    if wake == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            req = <Request>batch[i]
            if req.kind == KIND_BLOCKING:
                # seq_cst: the outcome is visible to whoever acquires DONE, and
                # the store is ordered before our read of parked (Dekker).
                bc_store_u32_seq_cst(&req.state, DONE)
                if bc_load_u32_seq_cst(&req.parked):
                    wake[nwake] = &req.state
                    nwake += 1
            elif req.kind == KIND_FUTURE:
                _complete_future(req)
            else:
                bc_store_u32_release(&req.state, DONE)
                if _abandoned(req):
                    continue
                if mailbox is None or req.loop is mailbox:
                    if mailbox is None:
                        mailbox, pending = req.loop, []
                    pending.append(req)
                else:
                    if more_loops is None:
                        more_loops = {}
                    more_loops.setdefault(req.loop, []).append(req)
        # `batch` keeps every request alive until the wakes are done.
        if nwake:
            with nogil:
                for i in range(nwake):
                    bc_unpark_one(wake[i])
        if mailbox is not None:
            mailbox.post(pending)
        if more_loops is not None:
            for other, reqs in more_loops.items():
                (<LoopMailbox>other).post(reqs)
    finally:
        free(wake)
    return 0


cdef bint _abandoned(Request req) except -1:
    """An asyncio request whose future is already done (its task was
    cancelled): drop its outcome here instead of posting it.  A post to a loop
    that never runs again would strand the request in the loop's mailbox, and
    with it (through the future) the loop itself."""
    fut = req.waiter
    if fut is not None and not fut.done():
        return False
    req.waiter = req.loop = None
    req.result = req.error = req.error_tb = None
    return True


cdef void _complete_future(Request req) except *:
    """DONE, then hand the stored outcome to the request's concurrent future."""
    fut = req.waiter
    req.waiter = None
    bc_store_u32_release(&req.state, DONE)
    result, error = req.result, req.error
    req.result = req.error = req.error_tb = None
    # The caller may have cancelled the future; that only discards the outcome.
    if fut.cancelled():
        return
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except BaseException as exc:
        # InvalidStateError (cancelled in between), or a done-callback of the
        # caller's that raised past concurrent.futures' own handler (SystemExit,
        # KeyboardInterrupt): it belongs to that caller alone, never to the
        # other callers of the batch nor to the worker.
        if fut.done() and not isinstance(exc, Exception):
            # Only text: the exception's traceback would keep the frames
            # (and the batch) alive as long as the log record lives.
            _log.error("batched_fn: a done-callback of a Future raised %s; ignored: %s",
                       type(exc).__name__, repr(exc))
