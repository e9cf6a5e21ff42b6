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
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TypeVar

from pydantic import ValidationError

from clawctl.errors import BadInput, IntegrityError, ModelNotFound
from clawctl.fsutil import atomic_write, copy_hashing, fsync_dir, sha256_file
from clawctl.paths import Paths
from clawctl.schemas.models import ModelManifest, OnnxInfo, QuantQuality, VerifyResult
from clawctl.store.catalog import Catalog, CatalogEntry, FilePart, Part, UrlPart
from clawctl.store.gguf_meta import read_gguf_info
from clawctl.store.names import name_from_filename, validate_model_name
from clawctl.store.sources import NullProgress, ProgressSink, open_part

STALE_TEMP_SECONDS = 24 * 3600
Checked = TypeVar("Checked")


ONNX_MAIN_FILE = "model.onnx"


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
        """The blob of a GGUF model (or the `model.onnx` of an ONNX one)."""
        manifest = self.get(name)
        blob = self.blob_path(manifest.digest)
        if not blob.is_file():
            raise IntegrityError(f"blob of {name!r} is missing; pull or add the model again")
        return blob

    def model_dir(self, manifest: ModelManifest) -> Path:
        """A directory holding an ONNX model's files under their names (symlinks to blobs).

        Runtimes such as onnxruntime-genai load a directory; the store keeps blobs. The layout
        is built once per digest set in a temp directory and renamed into place, so a reader
        never sees half of it.
        """
        key = hashlib.sha256(
            "\n".join(f"{k}={v}" for k, v in sorted(manifest.files.items())).encode()
        ).hexdigest()[:24]
        target = self.paths.models_dir / "dirs" / key
        if target.is_dir():
            return target
        missing = [n for n, d in manifest.files.items() if not self.blob_path(d).is_file()]
        if missing:
            raise IntegrityError(
                f"model {manifest.name!r} lost files ({', '.join(missing)}); pull it again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        try:
            for file_name, digest in manifest.files.items():
                link = staging / file_name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.blob_path(digest))
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

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

    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[Path]:
        """A scratch directory in the blobs dir (so its files can be renamed into blobs),
        removed with whatever the caller did not adopt."""
        self.paths.blobs_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_temps()
        work = Path(tempfile.mkdtemp(prefix=".partial-", suffix=".tmp", dir=self.paths.blobs_dir))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.paths.blobs_dir.glob(".partial-*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    if tmp.is_dir():
                        shutil.rmtree(tmp)
                    else:
                        tmp.unlink()

    def fetch(
        self,
        label: str,
        parts: list[Part],
        expected_sha256: str,
        dest: Path,
        progress: ProgressSink,
        total: int | None = None,
    ) -> None:
        """Stream parts into `dest` (a scratch file), refusing bytes that do not hash to
        `expected_sha256`: sources a conversion reads are pinned like models are."""
        with dest.open("wb") as out:
            actual = self._copy_parts(out, parts, f"fetching {label}", progress, total)
        _check_digest(label, actual, expected_sha256)

    def _copy_parts(
        self,
        out: IO[bytes],
        parts: list[Part],
        description: str,
        progress: ProgressSink,
        total: int | None,
    ) -> str:
        """Append every part's bytes to `out`; returns their sha256."""
        digest = hashlib.sha256()
        started = False
        for part in parts:
            with open_part(part, self.paths.download_cache, progress) as (stream, size):
                if not started:
                    progress.start(description, total or size)
                    started = True
                copy_hashing(stream, out, digest, progress.advance)
        return digest.hexdigest()

    def commit_blob(self, tmp: Path, digest: str) -> Path:
        blob = self.blob_path(digest)
        if blob.exists():
            return blob
        os.chmod(tmp, 0o644)
        os.replace(tmp, blob)
        fsync_dir(blob.parent)
        return blob

    def _write_manifest(
        self, name: str, digest: str, blob: Path, source: str, parent: str | None = None,
        quality: QuantQuality | None = None,
    ) -> ModelManifest:  # fmt: skip
        manifest = ModelManifest(
            name=name,
            digest=digest,
            size=blob.stat().st_size,
            source=source,
            created_at=datetime.now(timezone.utc),
            gguf=read_gguf_info(blob),
            parent=parent,
            quality=quality,
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
            with os.fdopen(fd, "wb") as out:
                actual = self._copy_parts(out, parts, f"importing {label}", progress, total)
                out.flush()
                os.fsync(out.fileno())
            if expected_sha256 is not None:
                _check_digest(label, actual, expected_sha256)
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
        self, ref: str, *, sha256: str | None = None, progress: ProgressSink | None = None,
        mirror: str | None = None,
    ) -> tuple[ModelManifest, bool]:  # fmt: skip
        """Install a catalog model or a URL; returns (manifest, fetched?). `mirror`: a URL of a
        catalog model's same bytes (the fleet's copy) to fetch instead of its source; they must
        still hash to the catalog's sha256."""
        progress = progress or NullProgress()
        if ref.startswith(("http://", "https://")):
            name = name_from_filename(ref.split("?")[0])
            parts: list[Part] = [UrlPart(kind="url", url=ref)]
            entry_sha, source, total = sha256, ref, None
        else:
            entry: CatalogEntry = self.catalog.get(validate_model_name(ref))
            name, parts, source = entry.name, list(entry.parts), entry.source_label()
            entry_sha, total = entry.sha256, entry.size
            if mirror is not None:
                parts = [UrlPart(kind="url", url=mirror)]
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
        self,
        path: Path,
        *,
        name: str | None = None,
        progress: ProgressSink | None = None,
        source: str | None = None,
    ) -> ModelManifest:
        """Import a local GGUF file under `name` (default: derived from the file name); the
        manifest records `source` (default: `file:<path>`)."""
        path = path.expanduser().resolve()
        if not path.is_file():
            raise BadInput(f"no such file: {path}")
        read_gguf_info(path)  # fail fast, before copying
        model_name = validate_model_name(name) if name else name_from_filename(path.name)
        part = FilePart(kind="file", path=str(path))
        label = source or f"file:{path}"
        return self._ingest(model_name, [part], None, label, progress or NullProgress())

    def upload_file(self) -> Path:
        """A new empty temp file in the blobs dir for an upload to stream into (same disk as the
        blobs; an abandoned one is swept like any `.partial-*.tmp`). The caller removes it."""
        self.paths.blobs_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_temps()
        fd, name = tempfile.mkstemp(
            prefix=".partial-upload-", suffix=".tmp", dir=self.paths.blobs_dir
        )
        os.close(fd)
        return Path(name)

    def import_built(
        self, name: str, built: Path, source: str, parent: str | None,
        quality: QuantQuality | None = None,
    ) -> ModelManifest:  # fmt: skip
        """Adopt a file produced inside the blobs dir (e.g. by the quantizer)."""
        digest = sha256_file(built)
        read_gguf_info(built)
        blob = self.commit_blob(built, digest)
        name = validate_model_name(name)
        return self._write_manifest(name, digest, blob, source, parent, quality)

    def import_onnx(
        self,
        name: str,
        files: dict[str, Path],
        info: OnnxInfo,
        source: str,
        parent: str | None = None,
    ) -> ModelManifest:
        """Adopt an ONNX model's files (built inside the blobs dir, e.g. in a temp dir there):
        each becomes a blob, then the manifest is written last."""
        if ONNX_MAIN_FILE not in files:
            raise BadInput(f"an ONNX model needs a {ONNX_MAIN_FILE}")
        digests: dict[str, str] = {}
        for file_name, path in files.items():
            digest = sha256_file(path)
            self.commit_blob(path, digest)
            digests[file_name] = digest
        main = digests[ONNX_MAIN_FILE]
        manifest = ModelManifest(
            name=validate_model_name(name),
            digest=main,
            size=sum(self.blob_path(d).stat().st_size for d in set(digests.values())),
            format="onnx",
            source=source,
            created_at=datetime.now(timezone.utc),
            onnx=info,
            files=digests,
            parent=parent,
        )
        atomic_write(self._manifest_path(name), manifest.model_dump_json(indent=2).encode())
        return manifest

    def remove(self, name: str) -> ModelManifest:
        manifest = self.get(name)
        self._manifest_path(name).unlink()
        fsync_dir(self.paths.manifests_dir)
        in_use = set().union(*(m.blob_digests() for m in self.installed()))
        for digest in manifest.blob_digests() - in_use:
            self.blob_path(digest).unlink(missing_ok=True)
        return manifest

    def verify(self, names: list[str] | None = None) -> list[VerifyResult]:
        targets = [self.get(n) for n in names] if names else self.installed()
        results = []
        for manifest in targets:
            ok, actual = True, None
            for digest in sorted(manifest.blob_digests()):
                blob = self.blob_path(digest)
                found = sha256_file(blob) if blob.is_file() else None
                if found != digest:
                    ok, actual = False, found
            results.append(
                VerifyResult(name=manifest.name, digest=manifest.digest, ok=ok, actual=actual)
            )
        return results


def _check_digest(label: str, actual: str, expected: str) -> None:
    if actual != expected.lower():
        raise IntegrityError(
            f"{label}: the bytes hash to {actual[:12]}…, expected "
            f"{expected[:12]}…; the source changed or is damaged"
        )
