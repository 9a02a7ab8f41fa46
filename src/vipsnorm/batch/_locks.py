"""Files opened under an exclusive advisory lock: one vipsnorm run at a time per manifest, file of fitted
inputs or patches table (POSIX ``flock``; Windows has none, and the files are opened unlocked)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["open_locked"]


def open_locked(path: Path, flags: int, *, cannot_open: str, busy: str | None) -> tuple[int, bool]:
    """Open (creating) ``path`` with ``flags`` and take its exclusive lock; return the descriptor (closing
    it releases the lock) and whether it is locked (False where there are no locks).

    ``busy`` is the cause of the :class:`OutputError` raised when another process holds the lock; None
    waits for it instead. ``cannot_open`` is the cause when the file cannot be opened or locked, with
    ``{}`` for the system's reason; also when ``path`` is not a regular file (a FIFO, a device such as
    ``/dev/null``, a socket, or a link to one), where rows would be lost or the open would block: it is
    opened without blocking to be asked, then closed, untouched.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as exc:
        raise OutputError(path, cannot_open.format(exc.strerror or exc)) from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular and hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        raise OutputError(path, cannot_open.format(exc.strerror or exc)) from None
    if not regular:
        os.close(fd)
        raise OutputError(path, cannot_open.format("not a regular file: a FIFO, device or socket"))
    if fcntl is None:
        return fd, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if busy is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(path, busy) from None
    except OSError as exc:  # no locks on this file system (some NFS set-ups)
        os.close(fd)
        raise OutputError(path, cannot_open.format(exc.strerror or exc)) from None
    return fd, True
