"""Checks on the codebase itself: packaging of the data folders, lint, types and layering."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clawctl import resources

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_bundled_folders_resolve_in_the_source_tree() -> None:
    for name in resources.BUNDLED:
        assert resources.bundled_dir(name).is_dir()
    assert resources.catalog_file().is_file()


def test_wheel_ships_profiles_catalog_and_units(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("clawctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "clawctl/_bundled/edge_profiles/rpi5-8gb.toml",
        "clawctl/_bundled/edge_profiles/generic.toml",
        "clawctl/_bundled/models/catalog.toml",
        "clawctl/_bundled/daemon/clawd.service",
        "clawctl/_bundled/daemon/clawd.toml",
        "clawctl/py.typed",
    ):
        assert expected in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = "import clawctl.resources as r; print(r.bundled_dir('edge_profiles'))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(unpacked)),
    )
    assert done.stdout.strip() == str(unpacked / "clawctl" / "_bundled" / "edge_profiles")


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "clawctl", "tests", "bench"],
        ["ruff", "format", "--check", "clawctl", "tests", "bench"],
        ["mypy"],
        ["lint-imports"],
    ],
)
def test_static_checks(command: list[str]) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
