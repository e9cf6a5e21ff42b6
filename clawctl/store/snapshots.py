"""Where snapshots live, and the prefix pool's index.

    <data>/snapshots/named/<name>.snap        explicit saves (`claw.snapshot.save`, CLI); kept
    <data>/snapshots/sessions/<id>.snap       the latest state of each `claw.session`
    <data>/snapshots/pool/<identity>/<h>.snap automatic shared prefixes

Pool lookups do not scan snapshots: a prompt's tokens are cut into fixed-size blocks and hashed
as a chain (each block's hash covers everything before it, seeded with the state identity), and
every pool file is indexed under each of its block hashes. The longest chain hash of a prompt
found in the index names a snapshot sharing that many blocks with it. The index is rebuilt from
the headers on first use, so it survives restarts. Pool and session files share a disk budget
with least-recently-used eviction; named snapshots are only removed on request.

Snapshots cross the admin API whole: export streams a file that was verified through the very
handle it is read from, and import takes an upload into a temp file beside the named snapshots,
verifies every chunk, and links it into place without replacing anything, so a damaged, foreign
or clashing upload leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from clawctl.errors import BadInput, ClawError, IntegrityError, NotFound
from clawctl.fsutil import fsync_dir
from clawctl.paths import Paths
from clawctl.schemas.snapshots import (
    Kind,
    RemovedSnapshot,
    SnapshotCheck,
    SnapshotDetail,
    SnapshotInfo,
)
from clawctl.schemas.state import StateIdentity
from clawctl.store.snapshot_format import (
    SnapshotHeader,
    read_header,
    read_open_snapshot,
    read_snapshot,
)

SUFFIX = ".snap"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TOKEN = struct.Struct("<i")
KINDS: tuple[Kind, ...] = ("named", "session", "pool")


def validate_snapshot_name(name: str, what: str = "snapshot") -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise BadInput(
            f"invalid {what} name {name!r}: 1-128 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit",
            param=what,
        )
    return name


def block_hashes(identity: StateIdentity, tokens: Sequence[int], block: int) -> list[str]:
    """Chain hashes of the prompt's full blocks: entry i covers tokens[: (i + 1) * block]."""
    digest = hashlib.sha256(identity.key().encode())
    hashes = []
    for start in range(0, len(tokens) - block + 1, block):
        digest.update(b"".join(_TOKEN.pack(t) for t in tokens[start : start + block]))
        hashes.append(digest.copy().hexdigest()[:32])
    return hashes


@dataclass(frozen=True)
class PoolHit:
    path: Path
    tokens: int  # how many leading prompt tokens the snapshot holds (block aligned)


class SnapshotStore:
    def __init__(self, paths: Paths, budget_bytes: int, block_tokens: int = 256) -> None:
        self.root = paths.data_dir / "snapshots"
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, Path]] = {}  # identity key -> chain hash -> file

    # --- locations -------------------------------------------------------------------------

    def dir_for(self, kind: Kind) -> Path:
        return self.root / {"named": "named", "session": "sessions", "pool": "pool"}[kind]

    def path_for(self, kind: Kind, name: str) -> Path:
        if kind == "pool":
            raise ValueError("pool paths come from pool_path()")
        return self.dir_for(kind) / f"{validate_snapshot_name(name, kind)}{SUFFIX}"

    def pool_path(self, identity: StateIdentity, chain_hash: str) -> Path:
        return self.dir_for("pool") / identity.key() / f"{chain_hash}{SUFFIX}"

    def _files(self, kind: Kind | None = None) -> list[tuple[Kind, Path]]:
        found: list[tuple[Kind, Path]] = []
        for k in [kind] if kind else list(KINDS):
            directory = self.dir_for(k)
            if directory.is_dir():
                pattern = f"*/*{SUFFIX}" if k == "pool" else f"*{SUFFIX}"
                found.extend((k, p) for p in sorted(directory.glob(pattern)))
        return found

    def find(self, name: str, kind: Kind | None = None) -> tuple[Kind, Path]:
        """A snapshot by name: named first, then sessions, then pool files by hash."""
        validate_snapshot_name(name)
        for k in [kind] if kind else list(KINDS):
            if k == "pool":
                matches = list(self.dir_for("pool").glob(f"*/{name}{SUFFIX}"))
                if matches:
                    return k, matches[0]
            else:
                path = self.path_for(k, name)
                if path.is_file():
                    return k, path
        raise NotFound(f"no snapshot named {name!r}; see 'clawctl snapshot list'", param="snapshot")

    # --- reading ---------------------------------------------------------------------------

    def info(self, kind: Kind, path: Path) -> SnapshotInfo:
        """What `list` shows; the name is the file's (what `find` looks it up by)."""
        header = read_header(path)
        stat = path.stat()
        return SnapshotInfo(
            kind=kind, name=path.stem, tokens=len(header.tokens), raw_size=header.raw_size,
            stored_size=stat.st_size, model_sha256=header.identity.model_sha256,
            kv_type=header.identity.type_k, created_at=header.created_at.timestamp(),
            last_used=stat.st_mtime,
        )  # fmt: skip

    def detail(self, name: str) -> SnapshotDetail:
        """One snapshot's header without its token ids (`show`)."""
        kind, path = self.find(name)
        header = read_header(path)
        stat = path.stat()
        return SnapshotDetail(
            kind=kind, name=path.stem, n_tokens=len(header.tokens), raw_size=header.raw_size,
            stored_size=stat.st_size, created_at=header.created_at, last_used=stat.st_mtime,
            identity=header.identity, filter=header.filter, level=header.level,
            chunks=header.chunks,
        )  # fmt: skip

    def entries(self, kind: Kind | None = None) -> list[SnapshotInfo]:
        infos = []
        for k, path in self._files(kind):
            with contextlib.suppress(ClawError, OSError):
                infos.append(self.info(k, path))
        return infos

    def load(self, path: Path, expected: StateIdentity | None) -> tuple[SnapshotHeader, bytearray]:
        header, raw = read_snapshot(path, expected)
        self.touch(path)
        return header, raw

    @staticmethod
    def touch(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)

    def verify(self) -> list[SnapshotCheck]:
        """Read every file through and check every checksum (slow: decompresses everything)."""
        reports = []
        for kind, path in self._files():
            try:
                read_snapshot(path)
            except (ClawError, OSError) as exc:
                problem = exc.message if isinstance(exc, ClawError) else str(exc)
                reports.append(SnapshotCheck(kind=kind, name=path.stem, ok=False, problem=problem))
            else:
                reports.append(SnapshotCheck(kind=kind, name=path.stem, ok=True))
        return reports

    # --- the pool index ----------------------------------------------------------------------

    def _pool_index(self, identity: StateIdentity) -> dict[str, Path]:
        key = identity.key()
        if key not in self._index:
            index: dict[str, Path] = {}
            directory = self.dir_for("pool") / key
            for path in sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []:
                with contextlib.suppress(ClawError, OSError):
                    header = read_header(path)
                    for chain in block_hashes(identity, header.tokens, self.block_tokens):
                        index[chain] = path
            self._index[key] = index
        return self._index[key]

    def pool_lookup(self, identity: StateIdentity, hashes: Sequence[str]) -> PoolHit | None:
        with self._lock:
            index = self._pool_index(identity)
            for i in range(len(hashes) - 1, -1, -1):
                path = index.get(hashes[i])
                if path is not None and path.is_file():
                    return PoolHit(path, (i + 1) * self.block_tokens)
        return None

    def pool_has(self, identity: StateIdentity, chain_hash: str) -> bool:
        with self._lock:
            path = self._pool_index(identity).get(chain_hash)
            return path is not None and path.is_file()

    def pool_added(self, identity: StateIdentity, path: Path, tokens: Sequence[int]) -> None:
        with self._lock:
            index = self._pool_index(identity)
            for chain in block_hashes(identity, tokens, self.block_tokens):
                index[chain] = path

    # --- removing ----------------------------------------------------------------------------

    def remove(self, name: str, kind: Kind | None = None) -> RemovedSnapshot:
        """Unlink a snapshot (damaged or not); a reader that has it open finishes reading."""
        found, path = self.find(name, kind)
        path.unlink()
        self._forget(path)
        return RemovedSnapshot(kind=found, name=path.stem)

    def _forget(self, path: Path) -> None:
        with self._lock:
            for index in self._index.values():
                for chain in [c for c, p in index.items() if p == path]:
                    del index[chain]

    def prune(
        self, max_bytes: int | None = None, older_than: float | None = None,
        kinds: Sequence[Kind] = ("session", "pool"),
    ) -> list[Path]:  # fmt: skip
        """Remove snapshots unused for `older_than` seconds, then least recently used ones until
        the rest fit in `max_bytes`."""
        files = []
        for kind in kinds:
            for _, path in self._files(kind):
                with contextlib.suppress(OSError):
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        removed = []
        now = time.time()
        total = sum(size for _, size, _ in files)
        for used, size, path in files:
            too_old = older_than is not None and now - used > older_than
            too_big = max_bytes is not None and total > max_bytes
            if not (too_old or too_big):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._forget(path)
            removed.append(path)
            total -= size
        return removed

    def enforce_budget(self) -> list[Path]:
        return self.prune(max_bytes=self.budget_bytes)

    # --- moving ------------------------------------------------------------------------------

    def open_verified(self, name: str) -> tuple[BinaryIO, int]:
        """An open handle on a snapshot, positioned at its start, whose every byte was checked
        through that same handle; and its size. The caller closes it."""
        _, path = self.find(name)
        handle = path.open("rb")
        try:
            read_open_snapshot(handle, path.name)  # never export a damaged file
            handle.seek(0)
            return handle, os.fstat(handle.fileno()).st_size
        except BaseException:
            handle.close()
            raise

    @contextlib.contextmanager
    def incoming(self) -> Iterator[tuple[Path, BinaryIO]]:
        """A temp file beside the named snapshots for an upload, removed on the way out whatever
        happened (`adopt` links it into place first; clawd sweeps leftovers of a kill at start)."""
        directory = self.dir_for("named")
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".import-", suffix=".tmp", dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w+b") as handle:
                yield tmp, handle
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(self, tmp: Path, handle: BinaryIO, name: str | None = None) -> SnapshotInfo:
        """Verify an uploaded snapshot completely and add it as a named snapshot under `name`
        (default: the name in its header). Never replaces an existing snapshot."""
        if name is not None:
            validate_snapshot_name(name)
        handle.flush()
        os.fsync(handle.fileno())
        handle.seek(0)
        try:
            header, _ = read_open_snapshot(handle, "the uploaded file")
        except IntegrityError as exc:
            raise BadInput(f"not a usable clawctl snapshot: {exc.message}") from None
        target = self.path_for("named", name or header.name)
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, target)  # fails rather than replace: a name is never silently reused
        except FileExistsError:
            raise BadInput(
                f"snapshot {target.stem!r} already exists; rm it or import under another --name",
                param="name",
            ) from None
        fsync_dir(target.parent)
        return self.info("named", target)

    def sweep_temps(self) -> None:
        """Remove temp files left by a writer that was killed mid-write."""
        if self.root.is_dir():
            for tmp in self.root.rglob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
