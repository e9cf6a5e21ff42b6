"""llama.cpp's own `llama-server`, built once from the llama-cpp-python sdist's vendor/llama.cpp.

The anchor for the concurrency benchmark: the same llama.cpp version clawd runs, compiled with
the same portable flags as the Makefile, cached under the user cache dir (not the repo)."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

from platformdirs import user_cache_path

VERSION = "0.3.36"
X86_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
]


def cmake_flags() -> list[str]:
    arch = X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else []
    return [
        *arch,
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
    ]


def ensure_llama_server(log: Path | None = None) -> Path:
    """Path of a built `llama-server` binary (downloads the sdist and builds on first use)."""
    key = hashlib.sha256(f"{VERSION} {cmake_flags()}".encode()).hexdigest()[:16]
    root = user_cache_path("clawctl") / "llama-server" / key
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    out = log.open("ab") if log else subprocess.DEVNULL
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={VERSION}", "-d", str(root)],
            check=True, stdout=out, stderr=out,
        )  # fmt: skip
    source = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
    build = root / "build"
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build), *cmake_flags()],
        check=True, stdout=out, stderr=out,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"],
        check=True, stdout=out, stderr=out,
    )  # fmt: skip
    return binary


if __name__ == "__main__":
    print(ensure_llama_server(Path("/dev/stderr")))
