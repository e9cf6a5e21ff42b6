"""The installed-model store: content-addressed blobs plus one JSON manifest per model name.

A blob is written to a temp file beside its final place while it is hashed, checked against the
expected sha256 and parsed as GGUF, and only then renamed to `blobs/sha256-<hex>`; the manifest is
written last, atomically. A model is therefore visible only once its bytes are verified, and an
interrupted pull or add leaves the store as it was (at most an invisible temp file, swept later).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from clawctl.errors import BadInput, IntegrityError, ModelNotFound
from clawctl.fsutil import atomic_write, copy_hashing, fsync_dir, sha256_file
from clawctl.paths import Paths
from clawctl.store.catalog import Catalog, CatalogEntry, FilePart, Part, UrlPart
from clawctl.store.gguf_meta import GgufInfo, read_gguf_info
from clawctl.store.names import name_from_filename, validate_model_name
from clawctl.store.sources import NullProgress, ProgressSink, open_part

STALE_TEMP_SECONDS = 24 * 3600
Checked = TypeVar("Checked")


class ModelManifest(BaseModel):
    """One installed model: its name, its blob and what its GGUF header says."""

    model_config = ConfigDict(frozen=True)

    name: str
    digest: str
    size: int
    format: str = "gguf"
    source: str
    created_at: datetime
    gguf: GgufInfo
    parent: str | None = None


class VerifyResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    digest: str
    ok: bool
    actual: str | None = None


class ModelStore:
    """Models installed under `paths.models_dir`."""

    def __init__(self, paths: Paths, catalog: Catalog | None = None) -> None:
        self.paths = paths
        self._catalog = catalog

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog.load()
        return self._catalog

    # --- reading -------------------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        return self.paths.manifests_dir / f"{validate_model_name(name)}.json"

    def blob_path(self, digest: str) -> Path:
        return self.paths.blobs_dir / f"sha256-{digest}"

    def installed(self) -> list[ModelManifest]:
        if not self.paths.manifests_dir.is_dir():
            return []
        manifests = []
        for path in sorted(self.paths.manifests_dir.glob("*.json")):
            with contextlib.suppress(ValidationError, OSError):
                manifests.append(ModelManifest.model_validate_json(path.read_bytes()))
        return manifests

    def get(self, name: str) -> ModelManifest:
        path = self._manifest_path(name)
        if not path.is_file():
            hint = (
                " (run 'clawctl models pull " + name + "')" if name in self.catalog.models else ""
            )
            raise ModelNotFound(f"model {name!r} is not installed{hint}", param="model")
        try:
            return ModelManifest.model_validate_json(path.read_bytes())
        except ValidationError:
            raise IntegrityError(
                f"manifest of {name!r} is damaged; run 'clawctl models rm {name}'"
            ) from None

    def model_file(self, name: str) -> Path:
        manifest = self.get(name)
        blob = self.blob_path(manifest.digest)
        if not blob.is_file():
            raise IntegrityError(f"blob of {name!r} is missing; pull or add the model again")
        return blob

    # --- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def temp_blob(self) -> Iterator[tuple[Path, int]]:
        """A temp file in the blobs dir, removed unless the caller renamed it away."""
        self.paths.blobs_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_temps()
        fd, name = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=self.paths.blobs_dir)
        tmp = Path(name)
        try:
            yield tmp, fd
        finally:
            tmp.unlink(missing_ok=True)

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.paths.blobs_dir.glob(".partial-*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def commit_blob(self, tmp: Path, digest: str) -> Path:
        blob = self.blob_path(digest)
        if blob.exists():
            return blob
        os.chmod(tmp, 0o644)
        os.replace(tmp, blob)
        fsync_dir(blob.parent)
        return blob

    def _write_manifest(
        self, name: str, digest: str, blob: Path, source: str, parent: str | None = None
    ) -> ModelManifest:
        manifest = ModelManifest(
            name=name,
            digest=digest,
            size=blob.stat().st_size,
            source=source,
            created_at=datetime.now(timezone.utc),
            gguf=read_gguf_info(blob),
            parent=parent,
        )
        atomic_write(self._manifest_path(name), manifest.model_dump_json(indent=2).encode())
        return manifest

    def ingest(
        self,
        label: str,
        parts: list[Part],
        expected_sha256: str | None,
        progress: ProgressSink,
        check: Callable[[Path], Checked],
        total: int | None = None,
    ) -> tuple[str, Path, Checked]:
        """Stream parts into a blob: hashed, compared with `expected_sha256`, checked by `check`
        (which raises to refuse it) and only then given its content address. Returns the digest,
        the blob path and what `check` returned."""
        with self.temp_blob() as (tmp, fd):
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                started = False
                for part in parts:
                    with open_part(part, self.paths.download_cache, progress) as (stream, size):
                        if not started:
                            progress.start(f"importing {label}", total or size)
                            started = True
                        copy_hashing(stream, out, digest, progress.advance)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256.lower():
                raise IntegrityError(
                    f"{label}: the bytes hash to {actual[:12]}…, expected "
                    f"{expected_sha256[:12]}…; the source changed or is damaged"
                )
            checked = check(tmp)  # rejects truncated or foreign files before they are visible
            blob = self.commit_blob(tmp, actual)
        return actual, blob, checked

    def _ingest(
        self,
        name: str,
        parts: list[Part],
        expected_sha256: str | None,
        source: str,
        progress: ProgressSink,
        total: int | None = None,
    ) -> ModelManifest:
        digest, blob, _ = self.ingest(name, parts, expected_sha256, progress, read_gguf_info, total)
        return self._write_manifest(name, digest, blob, source)

    def pull(
        self, ref: str, *, sha256: str | None = None, progress: ProgressSink | None = None
    ) -> tuple[ModelManifest, bool]:
        """Install a catalog model or a URL; returns (manifest, fetched?)."""
        progress = progress or NullProgress()
        if ref.startswith(("http://", "https://")):
            name = name_from_filename(ref.split("?")[0])
            parts: list[Part] = [UrlPart(kind="url", url=ref)]
            entry_sha, source, total = sha256, ref, None
        else:
            entry: CatalogEntry = self.catalog.get(validate_model_name(ref))
            name, parts, source = entry.name, list(entry.parts), entry.source_label()
            entry_sha, total = entry.sha256, entry.size
        with contextlib.suppress(ModelNotFound, IntegrityError):
            existing = self.get(name)
            if self.blob_path(existing.digest).is_file() and (
                entry_sha is None or existing.digest == entry_sha
            ):
                return existing, False
        if entry_sha is not None and self.blob_path(entry_sha).is_file():
            return self._write_manifest(name, entry_sha, self.blob_path(entry_sha), source), False
        return self._ingest(name, parts, entry_sha, source, progress, total), True

    def add(
        self, path: Path, *, name: str | None = None, progress: ProgressSink | None = None
    ) -> ModelManifest:
        """Import a local GGUF file under `name` (default: derived from the file name)."""
        path = path.expanduser().resolve()
        if not path.is_file():
            raise BadInput(f"no such file: {path}")
        read_gguf_info(path)  # fail fast, before copying
        model_name = validate_model_name(name) if name else name_from_filename(path.name)
        part = FilePart(kind="file", path=str(path))
        return self._ingest(model_name, [part], None, f"file:{path}", progress or NullProgress())

    def import_built(self, name: str, built: Path, source: str, parent: str) -> ModelManifest:
        """Adopt a file produced inside the blobs dir (e.g. by the quantizer)."""
        digest = sha256_file(built)
        read_gguf_info(built)
        blob = self.commit_blob(built, digest)
        return self._write_manifest(validate_model_name(name), digest, blob, source, parent)

    def remove(self, name: str) -> ModelManifest:
        manifest = self.get(name)
        self._manifest_path(name).unlink()
        fsync_dir(self.paths.manifests_dir)
        if not any(m.digest == manifest.digest for m in self.installed()):
            self.blob_path(manifest.digest).unlink(missing_ok=True)
        return manifest

    def verify(self, names: list[str] | None = None) -> list[VerifyResult]:
        targets = [self.get(n) for n in names] if names else self.installed()
        results = []
        for manifest in targets:
            blob = self.blob_path(manifest.digest)
            actual = sha256_file(blob) if blob.is_file() else None
            results.append(
                VerifyResult(
                    name=manifest.name,
                    digest=manifest.digest,
                    ok=actual == manifest.digest,
                    actual=actual,
                )
            )
        return results
