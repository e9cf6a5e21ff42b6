"""The snapshot file format on its own: round trips, and every kind of damage rejected cleanly
before a byte reaches llama.cpp."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clawctl.config import load_paths
from clawctl.errors import IntegrityError
from clawctl.schemas.state import AdapterRef, StateIdentity
from clawctl.store.snapshot_format import (
    CHUNK_BYTES,
    MAGIC,
    PREFIX,
    SnapshotMismatch,
    encode,
    read_header,
    read_snapshot,
    shuffle2,
    unshuffle2,
    write_snapshot,
)
from clawctl.store.snapshots import SnapshotStore, block_hashes

IDENTITY = StateIdentity(
    model_sha256="a" * 64,
    state_format="llama-cpp-python/x/session-v10",
    n_ctx=4096,
    type_k="f16",
    type_v="f16",
    flash_attn=False,
)


def _raw(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    # f16-like data: high bytes from a narrow range, low bytes noisy, as real KV caches
    return bytes(
        rng.choice((0x3C, 0x3D, 0xBC, 0xBD)) if i % 2 else rng.randrange(256) for i in range(size)
    )


@pytest.fixture(scope="module")
def raw() -> bytes:
    return _raw(CHUNK_BYTES + 123_457)  # two chunks, the last one odd-sized


def _write(path: Path, raw: bytes, identity: StateIdentity = IDENTITY, **kw: object) -> None:
    header, chunks = encode(
        raw, kind="named", name=path.stem, identity=identity, tokens=list(range(100)), **kw
    )  # type: ignore[arg-type]
    write_snapshot(path, header, chunks)


@pytest.mark.parametrize("filter_", ["shuffle2", "none"])
def test_round_trip(tmp_path: Path, raw: bytes, filter_: str) -> None:
    path = tmp_path / "s.snap"
    _write(path, raw, filter_=filter_)
    header, back = read_snapshot(path, IDENTITY)
    assert bytes(back) == raw
    assert header.tokens == list(range(100))
    assert len(header.chunks) == 2
    assert path.read_bytes().startswith(MAGIC)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_shuffle_is_invertible_and_helps_f16_like_data(raw: bytes) -> None:
    assert unshuffle2(shuffle2(raw)) == raw
    assert unshuffle2(shuffle2(raw[:11])) == raw[:11]
    header_plain, _ = encode(
        raw, kind="named", name="x", identity=IDENTITY, tokens=[], filter_="none"
    )
    header_shuffled, _ = encode(raw, kind="named", name="x", identity=IDENTITY, tokens=[])
    assert header_shuffled.stored_size < header_plain.stored_size


def test_truncation_anywhere_is_rejected(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "s.snap"
    _write(path, raw)
    data = path.read_bytes()
    rng = random.Random(7)
    cuts = [0, 3, PREFIX.size, PREFIX.size + 10, len(data) - 1, len(data) - 40]
    cuts += [rng.randrange(len(data)) for _ in range(20)]
    for cut in cuts:
        damaged = tmp_path / f"cut-{cut}.snap"
        damaged.write_bytes(data[:cut])
        with pytest.raises(IntegrityError):
            read_snapshot(damaged, IDENTITY)


def test_bit_flips_anywhere_are_rejected(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "s.snap"
    _write(path, raw)
    data = path.read_bytes()
    rng = random.Random(11)
    positions = [0, 9, PREFIX.size + 5, len(data) - 1]
    positions += [rng.randrange(len(data)) for _ in range(40)]
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        damaged = tmp_path / f"flip-{position}.snap"
        damaged.write_bytes(bytes(flipped))
        with pytest.raises((IntegrityError, SnapshotMismatch)):
            read_snapshot(damaged, IDENTITY)


def test_wrong_magic_version_and_foreign_files(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "s.snap"
    _write(path, raw)
    data = path.read_bytes()
    (tmp_path / "magic.snap").write_bytes(b"NOTASNAP" + data[8:])
    (tmp_path / "version.snap").write_bytes(data[:8] + (99).to_bytes(2, "little") + data[10:])
    (tmp_path / "foreign.snap").write_bytes(Path(sys.executable).read_bytes()[:100_000])
    (tmp_path / "padded.snap").write_bytes(data + b"\x00" * 10)
    for name, fragment in [
        ("magic", "bad magic"),
        ("version", "version 99"),
        ("foreign", "bad magic"),
        ("padded", "truncated or padded"),
    ]:
        with pytest.raises(IntegrityError, match=fragment):
            read_snapshot(tmp_path / f"{name}.snap", IDENTITY)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_sha256": "b" * 64}, "model_sha256"),
        ({"adapters": (AdapterRef(sha256="c" * 64, scale=1.0),)}, "adapters"),
        ({"type_k": "q8_0", "type_v": "q8_0"}, "type_k"),
        ({"state_format": "llama-cpp-python/y/session-v11"}, "state_format"),
        ({"n_ctx": 2048}, "n_ctx"),
    ],
)
def test_identity_mismatch_is_refused_before_decompressing(
    tmp_path: Path, raw: bytes, change: dict[str, object], field: str
) -> None:
    path = tmp_path / "s.snap"
    _write(path, raw, identity=IDENTITY.model_copy(update=change))
    with pytest.raises(SnapshotMismatch, match=field):
        read_snapshot(path, IDENTITY)


def test_block_hashes_chain_and_depend_on_identity() -> None:
    tokens = list(range(1000))
    hashes = block_hashes(IDENTITY, tokens, 256)
    assert len(hashes) == 3
    assert block_hashes(IDENTITY, tokens[:600] + [0] * 400, 256)[:2] == hashes[:2]
    assert block_hashes(IDENTITY, tokens[:600] + [0] * 400, 256)[2] != hashes[2]
    other = IDENTITY.model_copy(update={"type_k": "q8_0"})
    assert block_hashes(other, tokens, 256)[0] != hashes[0]


def test_store_names_are_validated() -> None:
    from clawctl.errors import BadInput

    store = SnapshotStore(load_paths(), budget_bytes=1 << 30)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(BadInput):
            store.path_for("named", bad)


def test_sigkill_during_saves_leaves_no_partial_snapshot(tmp_path: Path) -> None:
    """A writer killed at a random moment leaves complete snapshots or none, never a torn one."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from pathlib import Path
        import os
        from tests.test_snapshot_format import IDENTITY, _write
        raw = os.urandom(3 * 1024 * 1024)
        i = 0
        while True:
            _write(Path({str(tmp_path)!r}) / f"s{{i % 3}}.snap", raw)
            i += 1
    """)
    for delay in (0.9, 1.3, 1.7, 2.2):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for snap in tmp_path.glob("*.snap"):
            header, back = read_snapshot(snap, IDENTITY)
            assert len(back) == header.raw_size
    store = SnapshotStore(load_paths(), budget_bytes=1 << 30)
    store.root = tmp_path  # sweep the writer's leftovers like clawd does at start-up
    store.sweep_temps()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert read_header(next(tmp_path.glob("*.snap"))).identity == IDENTITY


def test_budget_evicts_least_recently_used_pool_and_sessions_but_keeps_named(
    tmp_path: Path,
) -> None:
    store = SnapshotStore(load_paths(), budget_bytes=1 << 30)
    raw = _raw(200_000, seed=5)
    paths = {
        "named": store.path_for("named", "keep-me"),
        "old-session": store.path_for("session", "old"),
        "new-session": store.path_for("session", "new"),
        "pool": store.pool_path(IDENTITY, "c" * 32),
    }
    for age, (label, path) in enumerate(paths.items()):
        header, chunks = encode(
            raw, kind="named", name=label, identity=IDENTITY, tokens=list(range(300))
        )
        write_snapshot(path, header, chunks)
        os.utime(path, (1_000_000 + age * 1000, 1_000_000 + age * 1000))
    store.pool_added(IDENTITY, paths["pool"], list(range(300)))
    one = paths["pool"].stat().st_size
    store.budget_bytes = one  # room for one of the three prunable files
    removed = store.enforce_budget()
    assert sorted(p.name for p in removed) == ["new.snap", "old.snap"]
    assert paths["named"].exists()
    assert paths["pool"].exists()
    assert store.pool_lookup(IDENTITY, block_hashes(IDENTITY, list(range(300)), 256)) is not None
    store.touch(paths["pool"])
    assert [e.kind for e in store.entries()] == ["named", "pool"]
    assert store.prune(older_than=0.0) == [paths["pool"]]
    assert store.pool_lookup(IDENTITY, block_hashes(IDENTITY, list(range(300)), 256)) is None
