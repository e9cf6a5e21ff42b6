"""The snapshot file format: llama.cpp state, compressed, integrity-checked, never executable.

Layout (all integers little-endian; see docs/snapshot-format.md):

    magic "CLAWSNAP" | u16 version | u32 header length | header (JSON) | sha256(header) | chunks

The header names what the state belongs to (`StateIdentity`: model, adapters, llama.cpp state
format, context size, KV types, flash attention) and the token ids it holds, then describes the
payload: the raw state is cut into fixed-size chunks, each optionally byte-shuffled (f16 KV
compresses better as two byte planes) and compressed as an independent zstd frame with its own
content checksum, plus an xxh3-128 of the raw chunk. Chunks are compressed and decompressed in
parallel threads (zstd and numpy release the GIL). numpy, zstandard and xxhash are imported on
first use so `clawctl snapshot list` (headers only) stays light.

A reader checks magic, version, the header digest and the identity before decompressing anything,
and every chunk's size and checksum before returning a byte, so truncated, bit-flipped or foreign
files never reach llama.cpp. The format is plain data: nothing in it can run code.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict, ValidationError

from clawctl.errors import BadInput, IntegrityError
from clawctl.fsutil import atomic_writer
from clawctl.schemas.snapshots import ChunkInfo, Filter, Kind
from clawctl.schemas.state import StateIdentity

MAGIC = b"CLAWSNAP"
VERSION = 1
PREFIX = struct.Struct("<8sHI")
DIGEST_SIZE = 32
CHUNK_BYTES = 4 << 20
MAX_HEADER_BYTES = 16 << 20


class SnapshotMismatch(BadInput):
    """A snapshot exists but belongs to another model, adapter set, KV type or state format."""

    code = "snapshot_mismatch"


class SnapshotHeader(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Kind
    name: str
    created_at: datetime
    identity: StateIdentity
    tokens: list[int]
    raw_size: int
    filter: Filter
    level: int
    chunks: list[ChunkInfo]

    @property
    def stored_size(self) -> int:
        return sum(chunk.stored_size for chunk in self.chunks)


def shuffle2(chunk: bytes | memoryview) -> bytes:
    """Byte planes of 16-bit values: all low bytes, then all high bytes (odd tail kept as is)."""
    import numpy as np

    data = np.frombuffer(chunk, dtype=np.uint8)
    pairs = len(data) // 2
    out = np.empty_like(data)
    out[:pairs] = data[0 : 2 * pairs : 2]
    out[pairs : 2 * pairs] = data[1 : 2 * pairs : 2]
    out[2 * pairs :] = data[2 * pairs :]
    return out.tobytes()


def unshuffle2(chunk: bytes) -> bytes:
    out = bytearray(len(chunk))
    unshuffle2_into(chunk, memoryview(out))
    return bytes(out)


def unshuffle2_into(chunk: bytes | memoryview, out: memoryview) -> None:
    """Interleave the two byte planes of `chunk` straight into `out` (no temporary copies)."""
    import numpy as np

    data = np.frombuffer(chunk, dtype=np.uint8)
    target = np.frombuffer(out, dtype=np.uint8)
    pairs = len(data) // 2
    target[0 : 2 * pairs : 2] = data[:pairs]
    target[1 : 2 * pairs : 2] = data[pairs : 2 * pairs]
    target[2 * pairs :] = data[2 * pairs :]


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _encode_chunk(chunk: memoryview, filter_: Filter, level: int) -> tuple[bytes, ChunkInfo]:
    import xxhash
    import zstandard

    digest = xxhash.xxh3_128_hexdigest(chunk)
    data = shuffle2(chunk) if filter_ == "shuffle2" else chunk
    stored = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)
    return stored, ChunkInfo(raw_size=len(chunk), stored_size=len(stored), xxh3_128=digest)


def encode(
    raw: bytes | bytearray | memoryview,
    *,
    kind: Kind,
    name: str,
    identity: StateIdentity,
    tokens: Sequence[int],
    filter_: Filter = "shuffle2",
    level: int = 3,
) -> tuple[SnapshotHeader, list[bytes]]:
    """Compress a raw state into chunks (in parallel) and describe it."""
    view = memoryview(raw)
    pieces = [view[i : i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES)]
    with ThreadPoolExecutor(_threads()) as pool:
        encoded = list(pool.map(lambda c: _encode_chunk(c, filter_, level), pieces))
    header = SnapshotHeader(
        kind=kind,
        name=name,
        created_at=datetime.now(timezone.utc),
        identity=identity,
        tokens=list(tokens),
        raw_size=len(view),
        filter=filter_,
        level=level,
        chunks=[info for _, info in encoded],
    )
    return header, [stored for stored, _ in encoded]


def write_snapshot(path: Path, header: SnapshotHeader, chunks: list[bytes]) -> None:
    """Write atomically: a reader sees the old file, the new one, or none; never a partial."""
    header_bytes = header.model_dump_json().encode()
    with atomic_writer(path, mode=0o600) as out:
        out.write(PREFIX.pack(MAGIC, VERSION, len(header_bytes)))
        out.write(header_bytes)
        out.write(hashlib.sha256(header_bytes).digest())
        for chunk in chunks:
            out.write(chunk)


def _read_header(handle: BinaryIO, where: str) -> tuple[SnapshotHeader, int]:
    prefix = handle.read(PREFIX.size)
    if len(prefix) < PREFIX.size:
        raise IntegrityError(f"{where}: truncated snapshot (no header)")
    magic, version, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise IntegrityError(f"{where} is not a clawctl snapshot (bad magic)")
    if version != VERSION:
        raise IntegrityError(f"{where}: snapshot format version {version}, expected {VERSION}")
    if length > MAX_HEADER_BYTES:
        raise IntegrityError(f"{where}: implausible header length {length}")
    header_bytes = handle.read(length)
    digest = handle.read(DIGEST_SIZE)
    if len(header_bytes) < length or len(digest) < DIGEST_SIZE:
        raise IntegrityError(f"{where}: truncated snapshot header")
    if hashlib.sha256(header_bytes).digest() != digest:
        raise IntegrityError(f"{where}: snapshot header checksum mismatch (damaged file)")
    try:
        header = SnapshotHeader.model_validate(json.loads(header_bytes))
    except (ValueError, ValidationError):
        raise IntegrityError(f"{where}: unreadable snapshot header") from None
    return header, PREFIX.size + length + DIGEST_SIZE


def read_header(path: Path) -> SnapshotHeader:
    with path.open("rb") as handle:
        return read_open_header(handle, path.name)


def read_open_header(handle: BinaryIO, where: str) -> SnapshotHeader:
    """The header of a snapshot already open (from its start), leaving the handle after it: a
    caller that goes on to read the file reads the very file whose header it checked."""
    header, _ = _read_header(handle, where)
    return header


def _decode_chunk(
    stored: memoryview, info: ChunkInfo, filter_: Filter, out: memoryview, where: str
) -> None:
    """Decompress one chunk into its place in the raw state and check it."""
    import xxhash
    import zstandard

    try:
        data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=info.raw_size)
    except zstandard.ZstdError:
        raise IntegrityError(f"{where}: damaged snapshot payload") from None
    if len(data) != info.raw_size:
        raise IntegrityError(f"{where}: snapshot chunk has the wrong size")
    if filter_ == "shuffle2":
        unshuffle2_into(data, out)
    else:
        out[:] = data
    if xxhash.xxh3_128_hexdigest(out) != info.xxh3_128:
        raise IntegrityError(f"{where}: snapshot chunk checksum mismatch")


def read_snapshot(
    path: Path, expected: StateIdentity | None = None
) -> tuple[SnapshotHeader, bytearray]:
    """Read, check and decompress a snapshot; the identity is checked before the payload.

    The payload is memory-mapped and each chunk decompressed straight into its slice of the
    result by a pool of threads: hydration time is dominated by this function.
    """
    with path.open("rb") as handle:
        return read_open_snapshot(handle, path.name, expected)


def read_open_snapshot(
    handle: BinaryIO, where: str, expected: StateIdentity | None = None
) -> tuple[SnapshotHeader, bytearray]:
    """`read_snapshot` of a file already open (from its start): what is checked is what the
    caller goes on to read, even if the path is replaced meanwhile (export, import)."""
    header, start = _read_header(handle, where)
    if expected is not None:
        problem = expected.mismatch(header.identity)
        if problem is not None:
            raise SnapshotMismatch(f"snapshot {header.name!r} does not fit: {problem}")
    payload_size = os.fstat(handle.fileno()).st_size - start
    if payload_size != header.stored_size:
        raise IntegrityError(
            f"{where}: snapshot payload is {payload_size} bytes, header says "
            f"{header.stored_size} (truncated or padded)"
        )
    if sum(c.raw_size for c in header.chunks) != header.raw_size:
        raise IntegrityError(f"{where}: snapshot chunk sizes do not add up")
    raw = bytearray(header.raw_size)
    if header.raw_size == 0:
        return header, raw
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        source, target = memoryview(mapped), memoryview(raw)
        jobs, stored_at, raw_at = [], start, 0
        for info in header.chunks:
            jobs.append(
                (
                    source[stored_at : stored_at + info.stored_size],
                    info,
                    target[raw_at : raw_at + info.raw_size],
                )
            )
            stored_at += info.stored_size
            raw_at += info.raw_size
        try:
            with ThreadPoolExecutor(_threads()) as pool:
                list(
                    pool.map(
                        lambda job: _decode_chunk(job[0], job[1], header.filter, job[2], where),
                        jobs,
                    )
                )
        finally:
            for stored, _, out in jobs:
                stored.release()
                out.release()
            source.release()
            target.release()
    return header, raw
