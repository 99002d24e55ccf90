# asyncio delivery: one mailbox per event loop (see _aio.pyx).
cimport cython

cdef class LoopMailbox:
    cdef object loop_ref    # weak: a mailbox must not keep a finished loop alive
    # lock guards items and scheduled: workers (and the deadline thread) post
    # from their threads while the loop's thread drains.
    cdef cython.pymutex lock
    cdef list items         # finished requests not yet resolved in the loop
    cdef bint scheduled     # a drain is queued on the loop and has not started

    cdef void post(self, list reqs) except *

cdef LoopMailbox mailbox_for(object loop)
