"""LoRA adapters (GGUF) installed per base model: verified, content-addressed, hot-installable.

An adapter is checked against its base model before it becomes visible: `general.type` must be
`adapter`, `adapter.type` `lora`, `adapter.lora.alpha` present, the architecture the base's, and
every tensor a `<base tensor>.lora_a` / `.lora_b` pair whose shapes fit that base tensor the way
llama.cpp's loader requires (A: n_in x r, B: r x n_out; flipped for token_embd). Bytes go into
the model store's content-addressed blobs; the manifest is written last, so an interrupted install
leaves the store as it was. clawd reads manifests per request, so installing or removing an
adapter needs no restart. clawd runs installs in a build subprocess (`build/adapter_ops.py`);
its admin routes list, show, remove and verify in-process.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clawctl.errors import BadInput, IntegrityError, NotFound
from clawctl.fsutil import atomic_write, fsync_dir, sha256_file
from clawctl.schemas.adapters import AdapterCheck, AdapterManifest
from clawctl.schemas.models import ModelManifest
from clawctl.store.catalog import FilePart, Part, UrlPart
from clawctl.store.models import ModelStore
from clawctl.store.names import name_from_filename, validate_model_name
from clawctl.store.sources import NullProgress, ProgressSink

SUFFIXES = (".lora_a", ".lora_b")


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    from clawctl.store.gguf_meta import _teach_gguf_newer_types

    _teach_gguf_newer_types()
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise BadInput(f"{path.name} is not a GGUF file")
    try:
        return GGUFReader(path)
    except Exception as exc:
        raise BadInput(f"{path.name} is not a valid GGUF file: {exc}") from None


def _field(reader: Any, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def check_adapter(adapter: Path, base: Path) -> tuple[float, int, str, list[str]]:
    """Verify a LoRA GGUF against its base model; returns (alpha, rank, architecture, targets)."""
    reader = _reader(adapter)
    if _field(reader, "general.type") != "adapter":
        raise BadInput(
            f"{adapter.name} is not an adapter (general.type is {_field(reader, 'general.type')!r})"
        )
    if _field(reader, "adapter.type") != "lora":
        raise BadInput(
            f"{adapter.name} is not a LoRA adapter (adapter.type is "
            f"{_field(reader, 'adapter.type')!r})"
        )
    alpha = _field(reader, "adapter.lora.alpha")
    if not isinstance(alpha, int | float):
        raise BadInput(f"{adapter.name} has no adapter.lora.alpha")
    base_reader = _reader(base)
    arch, base_arch = (
        _field(reader, "general.architecture"),
        _field(base_reader, "general.architecture"),
    )
    if arch != base_arch:
        raise BadInput(
            f"{adapter.name} is for architecture {arch!r}, the base model is {base_arch!r}"
        )
    base_shapes = {t.name: [int(d) for d in t.shape] for t in base_reader.tensors}
    pairs: dict[str, dict[str, list[int]]] = {}
    for tensor in reader.tensors:
        suffix = next((s for s in SUFFIXES if tensor.name.endswith(s)), None)
        if suffix is None:
            raise BadInput(f"{adapter.name}: tensor {tensor.name} is not a .lora_a/.lora_b tensor")
        pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = [int(d) for d in tensor.shape]
    if not pairs:
        raise BadInput(f"{adapter.name} holds no LoRA tensors")
    ranks = set()
    for target, pair in sorted(pairs.items()):
        if target not in base_shapes:
            raise BadInput(f"{adapter.name}: {target} does not exist in the base model")
        if set(pair) != set(SUFFIXES):
            raise BadInput(f"{adapter.name}: {target} lacks its lora_a or lora_b tensor")
        a, b, w = pair[".lora_a"], pair[".lora_b"], base_shapes[target]
        if len(a) != 2 or len(b) != 2 or len(w) != 2:
            raise BadInput(f"{adapter.name}: {target} is not a matrix")
        if target == "token_embd.weight":  # llama.cpp applies it flipped
            fits, rank = w[0] == b[1] and w[1] == a[1], a[0]
        else:
            fits, rank = w[0] == a[0] and w[1] == b[1] and a[1] == b[0], a[1]
        if not fits:
            raise BadInput(
                f"{adapter.name}: {target} has shapes A {a} and B {b}, which do not fit the base "
                f"tensor {w}"
            )
        ranks.add(rank)
    return float(alpha), max(ranks), str(arch), sorted(pairs)


class AdapterStore:
    """Adapters under `<data>/adapters/<base model>/<name>.json`, bytes in the model blobs."""

    def __init__(self, models: ModelStore) -> None:
        self.models = models
        self.root = models.paths.data_dir / "adapters"

    def _manifest_path(self, base: str, name: str) -> Path:
        return self.root / validate_model_name(base) / f"{validate_model_name(name)}.json"

    def installed(self, base: str | None = None) -> list[AdapterManifest]:
        pattern = f"{validate_model_name(base)}/*.json" if base else "*/*.json"
        found = []
        for path in sorted(self.root.glob(pattern)) if self.root.is_dir() else []:
            with contextlib.suppress(ValidationError, OSError):
                found.append(AdapterManifest.model_validate_json(path.read_bytes()))
        return found

    def get(self, base: str, name: str) -> AdapterManifest:
        path = self._manifest_path(base, name)
        if not path.is_file():
            raise NotFound(
                f"adapter {name!r} is not installed for {base}; see 'clawctl adapters list'",
                param="adapters",
            )
        try:
            return AdapterManifest.model_validate_json(path.read_bytes())
        except ValidationError:
            raise IntegrityError(f"manifest of adapter {name!r} is damaged; rm it") from None

    def file(self, manifest: AdapterManifest) -> Path:
        blob = self.models.blob_path(manifest.digest)
        if not blob.is_file():
            raise IntegrityError(f"adapter {manifest.name!r} lost its bytes; install it again")
        return blob

    def install(
        self,
        ref: str,
        *,
        base: str,
        name: str | None = None,
        sha256: str | None = None,
        progress: ProgressSink | None = None,
        label: str | None = None,
    ) -> AdapterManifest:
        """Verify `ref` (a file or an http(s) URL) against `base` and install it; `label` is what
        the manifest records as its source (default: `ref`)."""
        base_manifest: ModelManifest = self.models.get(base)
        base_file = self.models.model_file(base)
        if ref.startswith(("http://", "https://")):
            part: Part = UrlPart(kind="url", url=ref)
        else:
            path = Path(ref).expanduser().resolve()
            if not path.is_file():
                raise BadInput(f"no such file: {path}")
            part = FilePart(kind="file", path=str(path))
        adapter_name = validate_model_name(name or name_from_filename(ref.split("?")[0]))
        digest, blob, (alpha, rank, arch, targets) = self.models.ingest(
            adapter_name,
            [part],
            sha256,
            progress or NullProgress(),
            lambda path: check_adapter(path, base_file),
        )
        manifest = AdapterManifest(
            name=adapter_name,
            base=base,
            base_digest=base_manifest.digest,
            digest=digest,
            size=blob.stat().st_size,
            alpha=alpha,
            rank=rank,
            architecture=arch,
            targets=targets,
            source=label or ref,
            created_at=datetime.now(timezone.utc),
        )
        atomic_write(
            self._manifest_path(base, adapter_name), manifest.model_dump_json(indent=2).encode()
        )
        return manifest

    def remove(self, base: str, name: str) -> AdapterManifest:
        manifest = self.get(base, name)
        path = self._manifest_path(base, name)
        path.unlink()
        fsync_dir(path.parent)
        in_use = {m.digest for m in self.models.installed()} | {a.digest for a in self.installed()}
        if manifest.digest not in in_use:
            self.models.blob_path(manifest.digest).unlink(missing_ok=True)
        return manifest

    def verify(self) -> list[AdapterCheck]:
        results = []
        for manifest in self.installed():
            blob = self.models.blob_path(manifest.digest)
            ok = blob.is_file() and sha256_file(blob) == manifest.digest
            results.append(AdapterCheck(base=manifest.base, name=manifest.name, ok=ok))
        return results
