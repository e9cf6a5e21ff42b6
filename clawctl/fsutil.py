"""Durable file writes and streaming hashes.

Stored data must survive a crash or a kill at any instant: every write goes to a temp file in the
same directory, is fsynced, renamed over the target, and the directory is fsynced. A reader then
sees either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

CHUNK = 1 << 20


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file whose contents replace `target` atomically on success.

    On any exception the temp file is removed and `target` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(target: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(target, mode) as handle:
        handle.write(data)


def copy_hashing(
    source: IO[bytes],
    dest: IO[bytes],
    digest: hashlib._Hash,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy a stream while hashing it; returns the number of bytes copied."""
    total = 0
    while chunk := source.read(CHUNK):
        dest.write(chunk)
        digest.update(chunk)
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return total


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()
