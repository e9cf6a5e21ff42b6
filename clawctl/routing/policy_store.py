"""Where policies live: installed ones in the config dir, shipped ones in the package.

clawd asks the store for a policy on every routed request; the parsed policy is cached by file
modification time, so `clawctl route apply` takes effect on the next request without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clawctl.errors import BadInput, NotFound
from clawctl.fsutil import atomic_write
from clawctl.paths import Paths
from clawctl.resources import bundled_dir
from clawctl.routing.policy import Policy, load_policy, parse_policy


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

    def apply(self, source: Path) -> PolicyFile:
        """Validate a policy file and install it under its own name (atomically)."""
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read policy file {source}: {exc}") from None
        policy = parse_policy(text, str(source))
        target = self.dir / f"{policy.name}.toml"
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text.encode("utf-8"))
        return PolicyFile(policy, target, shipped=False)

    def write(self, policy_file: PolicyFile, text: str) -> PolicyFile:
        """Replace an installed policy's text (checked first), e.g. after calibration."""
        policy = parse_policy(text, str(policy_file.path))
        target = self.dir / f"{policy.name}.toml"
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text.encode("utf-8"))
        return PolicyFile(policy, target, shipped=False)
