"""Where policies live: installed ones in the daemon's config dir, shipped ones in the package.

Only clawd opens this store (`/admin/policies` is how `clawctl route` reaches it). clawd asks it
for a policy on every routed request; the parsed policy is cached by file modification time, so
a policy installed with `clawctl route apply` (or rewritten by calibration) routes the next
request without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clawctl.errors import NotFound
from clawctl.fsutil import atomic_write
from clawctl.paths import Paths
from clawctl.resources import bundled_dir
from clawctl.routing.policy import load_policy, parse_policy
from clawctl.schemas.policy import Policy


@dataclass(frozen=True)
class PolicyFile:
    policy: Policy
    path: Path
    shipped: bool


class PolicyStore:
    def __init__(self, paths: Paths) -> None:
        self.dir = paths.policies_dir
        self._cache: dict[Path, tuple[int, Policy]] = {}

    @staticmethod
    def _shipped_dir() -> Path:
        return bundled_dir("daemon") / "policies"

    def _candidates(self, name: str) -> list[tuple[Path, bool]]:
        return [(self.dir / f"{name}.toml", False), (self._shipped_dir() / f"{name}.toml", True)]

    def names(self) -> list[str]:
        found = {p.stem for d in (self.dir, self._shipped_dir()) for p in d.glob("*.toml")}
        return sorted(found)

    def find(self, name: str) -> PolicyFile | None:
        """The policy called `name`, or None when there is none (so it may be a model name)."""
        for path, shipped in self._candidates(name):
            try:
                mtime = path.stat().st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                continue
            cached = self._cache.get(path)
            if cached is None or cached[0] != mtime:
                cached = (mtime, load_policy(path))
                self._cache[path] = cached
            return PolicyFile(cached[1], path, shipped)
        return None

    def get(self, name: str) -> PolicyFile:
        found = self.find(name)
        if found is None:
            raise NotFound(f"no routing policy named {name!r} (installed: {self.names()})")
        return found

    def install(self, text: str, source: str) -> PolicyFile:
        """Check a policy's text and install it under its own name (atomically); calibration
        rewrites an installed or shipped policy this way too."""
        policy = parse_policy(text, source)
        target = self.dir / f"{policy.name}.toml"
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text.encode("utf-8"))
        return PolicyFile(policy, target, shipped=False)
