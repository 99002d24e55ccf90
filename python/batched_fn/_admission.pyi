"""Typed stub of src/batchcore/_admission.pyx."""

import enum
from asyncio import Future

class OnFull(enum.IntEnum):
    REJECT = 0
    BLOCK = 1
    DROP_OLDEST = 2

def wake_room(fut: Future[None]) -> None: ...
