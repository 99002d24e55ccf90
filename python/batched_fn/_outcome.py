"""Per-item outcomes a handler can return."""

from __future__ import annotations

from typing import Final

__all__ = ["Failed"]


class Failed:
    """Put ``Failed(exc)`` at slot *i* of a handler's output to fail only caller *i*.

    That caller gets ``exc`` raised (the same object, its traceback kept); every
    other caller of the batch gets its own result.

    Raises:
        TypeError: ``exc`` is not an exception instance.
    """

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        if not isinstance(error, BaseException):
            raise TypeError(f"Failed() expects an exception instance (got {error!r})")
        self.error: Final = error

    def __repr__(self) -> str:
        return f"Failed({self.error!r})"
