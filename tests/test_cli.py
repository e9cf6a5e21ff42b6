"""`clawctl` as a user runs it: a subprocess, exit codes, `--json`, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon, run_cli

HEAVY = ("llama_cpp", "numpy", "fastapi", "onnxruntime", "uvicorn", "openai", "gguf", "zstandard")


def test_help_imports_nothing_heavy() -> None:
    code = f"import sys, clawctl.cli\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    help_text = run_cli("--help")
    assert help_text.returncode == 0
    for group in ("chat", "models", "profile", "service", "serve", "ps", "status"):
        assert group in help_text.stdout
    assert "CLAW_HOME" in help_text.stdout


def test_status_without_daemon_exits_3_with_next_step() -> None:
    done = run_cli("status")
    assert done.returncode == 3
    assert "clawctl serve" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_models_add_bad_file_exits_2_store_unchanged(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    done = run_cli("models", "add", str(bad))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    listed = run_cli("models", "list", "--json")
    assert json.loads(listed.stdout) == []


def test_models_add_list_show_verify_rm(smollm2_gguf: Path) -> None:
    added = run_cli("models", "add", str(smollm2_gguf), "--name", "tiny", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["gguf"]["architecture"] == "llama"
    listed = json.loads(run_cli("models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["tiny"]
    shown = run_cli("models", "show", "tiny")
    assert "Q4_1" in shown.stdout
    verified = json.loads(run_cli("models", "verify", "--json").stdout)
    assert verified[0]["ok"] is True
    assert run_cli("models", "rm", "tiny").returncode == 0
    missing = run_cli("models", "show", "tiny")
    assert missing.returncode == 2
    assert "not installed" in missing.stderr


def test_models_pull_unknown_name_exits_2() -> None:
    done = run_cli("models", "pull", "no-such-model")
    assert done.returncode == 2
    assert "not in the catalog" in done.stderr


def test_usage_error_exits_2() -> None:
    assert run_cli("models", "quantize", "x").returncode == 2  # missing --to
    assert run_cli("chat", "--max-tokens", "0", "hi").returncode == 2


def test_profile_commands() -> None:
    listed = json.loads(run_cli("profile", "list", "--json").stdout)
    names = {p["name"] for p in listed}
    assert {"rpi5-8gb", "rpi4-4gb", "jetson-orin-nano-8gb", "x86-small", "generic"} <= names
    detected = json.loads(run_cli("profile", "detect", "--json").stdout)
    assert detected["profile"]["name"] in names
    assert run_cli("profile", "show", "rpi5-8gb").returncode == 0
    unknown = run_cli("profile", "show", "toaster")
    assert unknown.returncode == 2
    assert "known profiles" in unknown.stderr


def test_env_shows_paths_under_claw_home(claw_home: Path) -> None:
    shown = json.loads(run_cli("env", "--json").stdout)
    assert shown["paths"]["data_dir"] == str(claw_home / "data")
    assert shown["paths"]["socket"] == str(claw_home / "run" / "clawd.sock")
    env = dict(os.environ, CLAW_SOCKET="/tmp/elsewhere.sock")
    assert json.loads(run_cli("env", "--json", env=env).stdout)["paths"]["socket"] == (
        "/tmp/elsewhere.sock"
    )


@pytest.mark.integration
def test_chat_status_ps_against_real_daemon(daemon: Daemon) -> None:
    env = dict(os.environ, CLAW_SOCKET=str(daemon.socket))
    reply = run_cli(
        "chat",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        env=env,
    )
    assert reply.returncode == 0, reply.stderr
    assert "Paris" in reply.stdout
    as_json = json.loads(run_cli("chat", "Say yes.", "--max-tokens", "4", "--json", env=env).stdout)
    assert as_json["content"]
    assert as_json["claw"]["model"] == "smollm2-135m"
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert status["status"] == "ok"
    ps = json.loads(run_cli("ps", "--json", env=env).stdout)
    assert [m["name"] for m in ps] == ["smollm2-135m"]
    unknown = run_cli("chat", "hi", "--model", "nope", env=env)
    assert unknown.returncode == 2
    assert "not installed" in unknown.stderr


@pytest.mark.integration
def test_interactive_chat_reads_stdin(daemon: Daemon) -> None:
    env = dict(os.environ, CLAW_SOCKET=str(daemon.socket))
    done = run_cli(
        "chat",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        env=env,
        input_text="What is the capital of France? Answer in one word.\n/bye\n",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_service_install_dry_run_renders_units() -> None:
    system = run_cli("service", "install", "--dry-run")
    assert system.returncode == 0
    assert "Type=notify" in system.stdout
    assert "User=clawd" in system.stdout
    assert "ListenStream=/run/clawd/clawd.sock" in system.stdout
    user = run_cli("service", "install", "--user", "--dry-run")
    assert "User=clawd" not in user.stdout
    assert "WantedBy=default.target" in user.stdout


def test_the_distill_worker_units_train_at_idle_priority() -> None:
    """clawd-distill.service trains in its own process tree, so its limits bind the training;
    the system one runs as the daemon's user on the daemon's data and socket."""
    from clawctl.clawd.units import render_units

    for user in (False, True):
        units = {u.target.name: u.text for u in render_units(user=user, clawd=sys.executable)}
        service, timer = units["clawd-distill.service"], units["clawd-distill.timer"]
        for line in ("Type=oneshot", "Nice=19", "CPUQuota=100%", "IOSchedulingClass=idle"):
            assert line in service.splitlines(), line
        command = next(line for line in service.splitlines() if line.startswith("ExecStart="))
        assert command.endswith("clawctl distill cycle --policy cascade")
        assert Path(command.removeprefix("ExecStart=").split()[0]).is_file()
        assert "OnCalendar=*-*-* 03:00:00" in timer
        assert "Persistent=true" in timer
        if not user:
            assert "User=clawd" in service
            assert "Environment=CLAW_HOME=/var/lib/clawd" in service
            assert "Environment=CLAW_SOCKET=/run/clawd/clawd.sock" in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    from clawctl.clawd.units import render_units

    for user in (False, True):
        unit_dir = tmp_path / ("user" if user else "system")
        unit_dir.mkdir()
        paths = []
        for unit in render_units(user=user, clawd=sys.executable):
            if unit.target.suffix in (".service", ".socket", ".timer"):
                (unit_dir / unit.target.name).write_text(unit.text)
                paths.append(str(unit_dir / unit.target.name))
        done = subprocess.run(
            ["systemd-analyze", "verify", *paths], capture_output=True, text=True, check=False
        )
        problems = [
            line for line in done.stderr.splitlines() if unit_dir.name in line or "clawd" in line
        ]
        assert done.returncode == 0, done.stderr
        assert problems == [], problems
