"""Names of shared functions: validation and the per-user files they live in."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile

__all__ = ["check_name", "runtime_dir", "socket_path", "lock_path"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
#: sun_path holds 108 bytes with its terminating NUL
_SUN_PATH_MAX = 107


def check_name(name: object) -> str:
    """Return name if it is a valid shared-function name, else raise at once.

    Valid: 1 to 200 letters, digits, ``-``, ``_`` or ``.``, without ``..``.

    Raises:
        TypeError: name is not a str.
        ValueError: name has another character, a path separator, ``..``, or
            is empty or too long.
    """
    if not isinstance(name, str):
        raise TypeError(f"invalid name value: expected a str (got {name!r})")
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError("invalid name value: expected 1 to 200 letters, digits or '-_.', "
                         f"without '..' (got {name!r})")
    return name


def runtime_dir() -> str:
    """The directory holding this user's shared names, created mode 0700.

    ``$XDG_RUNTIME_DIR/batched_fn`` when that variable names a directory of
    this user, else ``<tmp>/batched_fn-<uid>``.

    Raises:
        PermissionError: the directory exists but is not a private directory
            of this user (another user could reach the names in it).
    """
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = None
    if base:
        try:
            st = os.stat(base)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                path = os.path.join(base, "batched_fn")
        except OSError:
            pass
    if path is None:
        path = os.path.join(tempfile.gettempdir(), f"batched_fn-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private directory of this user (uid {uid}, mode 0700): "
                              "remove it or set XDG_RUNTIME_DIR")
    return path


def socket_path(directory: str, name: str) -> str:
    """The Unix socket of name; hashed when the plain path would not fit sun_path."""
    path = os.path.join(directory, name + ".sock")
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return os.path.join(directory, f"h-{digest}.sock")


def lock_path(directory: str, name: str) -> str:
    """The lock file whose flock marks name's live owner."""
    return os.path.join(directory, name + ".lock")
