"""Edge profiles (bundled, detection from device facts) and the config/paths foundation."""

from __future__ import annotations

from pathlib import Path

import pytest

from clawctl.config import load_client_config, load_daemon_config, load_paths
from clawctl.errors import BadInput, NotFound
from clawctl.paths import Paths
from clawctl.profiles import DeviceFacts, detect, list_profiles, load_profile

FACTS = {
    "rpi5": DeviceFacts("Raspberry Pi 5 Model B Rev 1.0", False, "aarch64", 8000, 4),
    "rpi4": DeviceFacts("Raspberry Pi 4 Model B Rev 1.4", False, "aarch64", 3800, 4),
    "jetson": DeviceFacts("NVIDIA Jetson Orin Nano Developer Kit", True, "aarch64", 7600, 6),
    "nuc": DeviceFacts("", False, "x86_64", 16000, 4),
    "odd": DeviceFacts("", False, "riscv64", 4000, 4),
}


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ("rpi5", "rpi5-8gb"),
        ("rpi4", "rpi4-4gb"),
        ("jetson", "jetson-orin-nano-8gb"),
        ("nuc", "x86-small"),
        ("odd", "generic"),
    ],
)
def test_detection(facts: str, expected: str) -> None:
    assert detect(load_paths(), FACTS[facts]).name == expected


def test_int2_tier_is_q2_0_only_on_arm() -> None:
    profiles = {p.name: p for p in list_profiles(load_paths())}
    assert profiles["rpi5-8gb"].int2_quant == "q2_0"
    assert profiles["x86-small"].int2_quant == "q2_k"


def test_user_profile_shadows_bundled(claw_home: Path) -> None:
    user_dir = load_paths().profiles_dir
    user_dir.mkdir(parents=True)
    (user_dir / "x86-small.toml").write_text(
        'description = "mine"\nthreads = 1\nn_ctx = 512\nn_batch = 64\n'
        'memory_budget_mb = 300\nmax_loaded_models = 1\nint4_quant = "q4_0"\nint2_quant = "q2_k"\n'
    )
    assert load_profile(load_paths(), "x86-small").description == "mine"
    (user_dir / "broken.toml").write_text("threads = 'many'\n")
    with pytest.raises(BadInput, match=r"broken\.toml"):
        load_profile(load_paths(), "broken")
    with pytest.raises(NotFound):
        load_profile(load_paths(), "toaster")


def test_claw_home_reroots_everything(claw_home: Path) -> None:
    paths = load_paths()
    for directory in (paths.data_dir, paths.cache_dir, paths.config_dir, paths.runtime_dir):
        assert directory.is_relative_to(claw_home)
    assert load_daemon_config().socket_path == claw_home / "run" / "clawd.sock"


def test_without_claw_home_platformdirs_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAW_HOME")
    paths = load_paths()
    assert "clawctl" in str(paths.data_dir)
    assert paths == Paths.build(None, paths.download_cache)


def test_claw_socket_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLAW_SOCKET", str(tmp_path / "x.sock"))
    assert load_daemon_config().socket_path == tmp_path / "x.sock"
    assert load_client_config().socket_path == tmp_path / "x.sock"


def test_user_config_file_and_errors(claw_home: Path) -> None:
    config_file = load_paths().config_file
    config_file.parent.mkdir(parents=True)
    config_file.write_text('[daemon]\ndefault_model = "qwen2.5-coder-0.5b"\nsocket_mode = "0600"\n')
    config = load_daemon_config()
    assert config.default_model == "qwen2.5-coder-0.5b"
    assert config.socket_mode == 0o600
    config_file.write_text("[daemon]\nunknown_key = 1\n")
    with pytest.raises(BadInput, match="unknown_key"):
        load_daemon_config()
    config_file.write_text('[daemon]\nsocket_mode = "rw-rw----"\n')
    with pytest.raises(BadInput, match="socket_mode"):
        load_daemon_config()
    config_file.write_text("[daemon\n")
    with pytest.raises(BadInput, match="invalid TOML"):
        load_daemon_config()


def test_shipped_default_config_is_valid() -> None:
    config = load_daemon_config()
    assert config.default_model == "smollm2-135m"
    assert config.tcp_host is None
    assert config.socket_mode == 0o660
