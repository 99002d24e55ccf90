"""Names of shared functions: validation, the per-user files they live in, peers' user ids.

A name ``NAME`` owns ``NAME.lock`` (its live owner holds an flock on it) and
``NAME.sock`` (the listening socket).  A name too long for a socket path has
its socket at ``+h-<digest>.sock``: ``+`` is not allowed in names, so no
name a user can choose maps to that file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import stat
import struct
import tempfile
import time

__all__ = ["check_name", "runtime_dir", "socket_path", "lock_path", "peer_uid", "take_lock", "remove_name",
           "clean_stale"]

_CRED = struct.Struct("3i")   # struct ucred: pid, uid, gid

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
    return os.path.join(directory, f"+h-{digest}.sock")


def lock_path(directory: str, name: str) -> str:
    """The lock file whose flock marks name's live owner."""
    return os.path.join(directory, name + ".lock")


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


def take_lock(directory: str, name: str) -> int | None:
    """Hold name's lock (an open fd with an flock on it), or None if a live process holds it.

    The lock file is removed by its last owner (:func:`remove_name`); a file
    opened just before that removal is not the name's lock any more, so the
    flock is retried on the file the path names now.
    """
    path = lock_path(directory, name)
    busy = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy += 1
            if busy > 5:
                return None
            time.sleep(0.002)   # clean_stale() holds a lock for microseconds: look again
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)   # removed (and maybe made anew) meanwhile: try the current file


def remove_name(directory: str, name: str, lock_fd: int) -> None:
    """Remove name's socket and lock files; the caller holds the lock (lock_fd), released here."""
    for path in (socket_path(directory, name), lock_path(directory, name)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    os.close(lock_fd)


def clean_stale(directory: str, name: str | None = None) -> int:
    """Remove the files of names whose owner died (every name, or only name); return how many names.

    A name is stale when its lock file exists and nobody holds its flock.
    """
    if name is not None:
        names = [name]
    else:
        try:
            names = [f[:-5] for f in os.listdir(directory) if f.endswith(".lock")]
        except OSError:
            return 0
    removed = 0
    for n in names:
        if not _NAME.fullmatch(n):
            continue
        try:
            fd = os.open(lock_path(directory, n), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EACCES):
                raise
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)   # a live owner
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path(directory, n)).st_ino
        except FileNotFoundError:
            same = False
        if same:
            remove_name(directory, n, fd)
            removed += 1
        else:
            os.close(fd)
    return removed
