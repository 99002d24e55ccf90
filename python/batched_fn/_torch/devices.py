"""Devices: resolving the user's device names, and telling which CUDA errors poison a device.

Nothing here initializes CUDA: a process that builds a model for "cuda" but
forks before the first call must not have touched the GPU yet.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["resolve_devices", "is_oom", "is_sticky"]

#: texts of CUDA errors after which the device's context stays broken for the
#: life of the process (every later kernel fails): a device-side assert, an
#: illegal address, a launch failure... (the CUDA runtime's own messages)
_STICKY_TEXTS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "unspecified launch failure",
    "misaligned address",
    "invalid program counter",
    "operation not supported on global/shared address space",
    "hardware stack error",
    "uncorrectable ecc error",
    "the launch timed out and was terminated",
    "cudaerrorassert",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchfailure",
)


def _resolve(name: Any) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid device value: expected a torch device such as 'cpu' or "
                         f"'cuda:0' (got {name!r})") from exc
    if dev.type == "cuda" and dev.index is None:
        # "cuda" means the caller's current device (torch.cuda.set_device),
        # read here, in the caller's thread: a worker thread starts on GPU 0.
        # Without CUDA initialized yet the current device is 0, and asking
        # would initialize it.
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        dev = torch.device("cuda", index)
    return dev


def resolve_devices(device: Any, devices: Sequence[Any] | None) -> list[torch.device]:
    """The list of devices from batched_model's ``device``/``devices`` arguments.

    Raises:
        ValueError: both are given, devices is empty, or a name is not a device.
    """
    if devices is not None:
        if device is not None:
            raise ValueError(f"invalid device value: give device or devices, not both (got {device!r})")
        if isinstance(devices, (str, bytes)) or not len(devices):
            raise ValueError(f"invalid devices value: expected a non-empty list of devices (got {devices!r})")
        names = list(devices)
    else:
        names = ["cpu" if device is None else device]
    return [_resolve(name) for name in names]


def resolve_device(name: Any) -> torch.device:
    """One device name (``output_device``) resolved like :func:`resolve_devices`."""
    return _resolve(name)


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure (recoverable: the context stays usable)."""
    return isinstance(exc, torch.OutOfMemoryError)


def is_sticky(exc: BaseException) -> bool:
    """True when exc says the CUDA context is broken for good (restart the process)."""
    if is_oom(exc) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(t in text for t in _STICKY_TEXTS)
