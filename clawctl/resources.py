"""Locate the data folders shipped with clawctl: edge profiles, the model catalog, the unit files.

In a wheel they live at `clawctl/_bundled/<name>` (hatchling force-include); in an editable install
or a source checkout force-include does not apply, so we fall back to the top-level folder of the
repository. This is the only lookup of those folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED = ("edge_profiles", "models", "daemon")


def bundled_dir(name: str) -> Path:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled folder {name!r}")
    for candidate in (_PACKAGE_DIR / "_bundled" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled folder {name!r} is missing from this installation")


def catalog_file() -> Path:
    return bundled_dir("models") / "catalog.toml"


def default_daemon_config() -> Path:
    return bundled_dir("daemon") / "clawd.toml"
