"""The one owner of filesystem locations.

platformdirs gives the per-user data, cache, config and runtime directories; a single `home`
(`CLAW_HOME`) re-roots all of them, which is what tests and throw-away installs use. Nothing else in
the package joins paths to find where things live.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "clawctl"
SOCKET_NAME = "clawd.sock"
SYSTEM_SOCKET = Path("/run/clawd") / SOCKET_NAME


@dataclass(frozen=True)
class Paths:
    """Where clawctl and clawd keep their files."""

    data_dir: Path
    cache_dir: Path
    config_dir: Path
    runtime_dir: Path
    download_cache: Path

    @classmethod
    def build(cls, home: Path | None = None, download_cache: Path | None = None) -> Paths:
        if home is not None:
            data, cache = home / "data", home / "cache"
            config, runtime = home / "config", home / "run"
        else:
            data = Path(platformdirs.user_data_dir(APP_NAME))
            cache = Path(platformdirs.user_cache_dir(APP_NAME))
            config = Path(platformdirs.user_config_dir(APP_NAME))
            with warnings.catch_warnings():  # no XDG_RUNTIME_DIR: its /tmp fallback is fine
                warnings.simplefilter("ignore")
                runtime = Path(platformdirs.user_runtime_dir(APP_NAME))
        return cls(data, cache, config, runtime, download_cache or cache / "downloads")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def blobs_dir(self) -> Path:
        return self.models_dir / "blobs"

    @property
    def manifests_dir(self) -> Path:
        return self.models_dir / "manifests"

    @property
    def ledger_file(self) -> Path:
        return self.data_dir / "ledger.db"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "clawd.toml"

    @property
    def policies_dir(self) -> Path:
        """Routing policies installed with `clawctl route apply` (they shadow shipped ones)."""
        return self.config_dir / "policies"

    @property
    def profiles_dir(self) -> Path:
        """User-supplied edge profiles, which shadow the bundled ones of the same name."""
        return self.config_dir / "edge_profiles"

    @property
    def default_socket(self) -> Path:
        return self.runtime_dir / SOCKET_NAME

    def pypi_cache(self) -> Path:
        return self.download_cache / "pypi"

    def url_cache(self) -> Path:
        return self.download_cache / "url"
