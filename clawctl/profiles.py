"""Edge profiles: per-device engine settings, and picking one for the box we run on.

A profile is a TOML file in `edge_profiles/` (bundled) or the user's config dir (which shadows a
bundled one of the same name). Detection reads facts once into a `DeviceFacts` value and then
matches it against each profile's `[match]` table in a fixed order; tests feed facts directly.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clawctl.errors import BadInput, NotFound
from clawctl.paths import Paths
from clawctl.resources import bundled_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KvType = Literal["f16", "q8_0", "q4_0"]
DETECT_ORDER = ("jetson-orin-nano-8gb", "rpi5-8gb", "rpi4-4gb", "x86-small")
FALLBACK = "generic"


class ProfileMatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_tree_model: str | None = None
    nv_tegra: bool | None = None
    arch: list[str] = Field(default_factory=list)
    min_memory_mb: int | None = None
    max_memory_mb: int | None = None


class EdgeProfile(BaseModel):
    """Engine and scheduler settings for one kind of device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    threads: int = Field(ge=0)
    n_ctx: int = Field(ge=256)
    # The context of a model trained for long ones (>= LONG_CONTEXT tokens, what agents such as
    # OpenClaw need): its own trained length up to this.
    long_ctx: int = Field(32768, ge=256)
    # KV memory of one loaded model. Where it holds a whole context per sequence, each sequence
    # gets its own stream (fastest); otherwise the sequences share one pool of this size
    # (llama.cpp's unified KV cache), so a long agent context and short requests run together.
    kv_budget_mb: int = Field(768, ge=16)
    n_batch: int = Field(ge=16)
    kv_cache_type: KvType = "f16"
    flash_attn: bool = False
    # Flash attention for long-context models whatever `flash_attn` says: on 2 x86 cores it cut
    # the prefill of OpenClaw's 12k-token first call on Qwen2.5-Coder-0.5B from 280 s to 176 s
    # (llama-server, whose default turns it on: 169 s); at 4k contexts it matters little.
    long_flash_attn: bool = True
    memory_budget_mb: int = Field(ge=64)
    max_loaded_models: int = Field(ge=1)
    # Continuous batching: generations of one model decoded together (llama.cpp's `-np`).
    parallel: int = Field(4, ge=1, le=32)
    # Speculative decoding by prompt lookup: draft tokens verified per step (0: off).
    draft_max: int = Field(12, ge=0, le=64)
    snapshot_budget_mb: int = Field(2048, ge=16)
    int4_quant: str
    int2_quant: str
    match: ProfileMatch = ProfileMatch()

    def effective_threads(self) -> int:
        return self.threads or psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@dataclass(frozen=True)
class DeviceFacts:
    device_tree_model: str
    nv_tegra: bool
    arch: str
    memory_mb: int
    physical_cores: int

    @classmethod
    def probe(cls) -> DeviceFacts:
        model_file = Path("/proc/device-tree/model")
        model = ""
        if model_file.is_file():
            model = model_file.read_bytes().rstrip(b"\x00").decode("utf-8", "replace")
        return cls(
            device_tree_model=model,
            nv_tegra=Path("/etc/nv_tegra_release").exists(),
            arch=platform.machine().lower(),
            memory_mb=psutil.virtual_memory().total // (1 << 20),
            physical_cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        )


def _profile_files(paths: Paths) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(bundled_dir("edge_profiles").glob("*.toml"))}
    if paths.profiles_dir.is_dir():
        files.update({p.stem: p for p in sorted(paths.profiles_dir.glob("*.toml"))})
    return files


def _read_profile(name: str, path: Path) -> EdgeProfile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return EdgeProfile.model_validate({"name": name, **raw})
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"edge profile {path}: invalid TOML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadInput(f"edge profile {path}: {where}: {first['msg']}") from None


def list_profiles(paths: Paths) -> list[EdgeProfile]:
    return [_read_profile(name, path) for name, path in _profile_files(paths).items()]


def load_profile(paths: Paths, name: str) -> EdgeProfile:
    if name == "auto":
        return detect(paths, DeviceFacts.probe())
    files = _profile_files(paths)
    if name not in files:
        known = ", ".join(sorted(files))
        raise NotFound(f"unknown edge profile {name!r}; known profiles: {known}")
    return _read_profile(name, files[name])


def matches(profile: EdgeProfile, facts: DeviceFacts) -> bool:
    rule = profile.match
    if rule == ProfileMatch():
        return False
    checks = [
        rule.device_tree_model is None or rule.device_tree_model in facts.device_tree_model,
        rule.nv_tegra is None or rule.nv_tegra == facts.nv_tegra,
        not rule.arch or facts.arch in rule.arch,
        rule.min_memory_mb is None or facts.memory_mb >= rule.min_memory_mb,
        rule.max_memory_mb is None or facts.memory_mb <= rule.max_memory_mb,
    ]
    return all(checks)


def detect(paths: Paths, facts: DeviceFacts) -> EdgeProfile:
    """The first profile (in DETECT_ORDER, then user profiles) whose `[match]` fits the facts."""
    profiles = {profile.name: profile for profile in list_profiles(paths)}
    order = [*DETECT_ORDER, *sorted(set(profiles) - set(DETECT_ORDER) - {FALLBACK})]
    for name in order:
        profile = profiles.get(name)
        if profile is not None and matches(profile, facts):
            return profile
    return profiles[FALLBACK]
