"""The data directory's lock: one clawd per data dir, whatever socket each one serves.

The socket check only stops a second daemon on the *same* socket; two daemons on different
sockets sharing a `CLAW_HOME` would both sweep snapshot temp files, prune the ledger and write
the stores. clawd takes an exclusive `flock` on `<data dir>/clawd.lock` before it builds its
services and holds it for its whole life; the kernel drops it when the process ends, however it
ends, so a crash never leaves a stale lock behind (the file stays; only the lock matters). The
holder writes its pid into the file so the refusal can name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from clawctl.errors import DaemonStartupError

LOCK_NAME = "clawd.lock"


def _holder(fd: int) -> str:
    """The pid the current holder wrote, as text ('' if unreadable)."""
    with contextlib.suppress(OSError):
        raw = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        if raw.isdigit():
            return raw
    return ""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[Path]:
    """Hold `<data_dir>/clawd.lock` exclusively, or raise `DaemonStartupError` (exit 3) naming
    the clawd that holds it."""
    path = data_dir / LOCK_NAME
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DaemonStartupError(f"cannot open the data dir lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise DaemonStartupError(f"cannot lock {path}: {exc.strerror}") from None
            pid = _holder(fd)
            who = f"clawd (pid {pid})" if pid else "another clawd"
            raise DaemonStartupError(
                f"{who} already uses the data dir {data_dir} ({path} is locked); stop it, or "
                "give this one another CLAW_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
