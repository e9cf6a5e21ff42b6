"""Rendering and installing clawd's systemd units from the templates shipped in `daemon/`.

System mode runs clawd as its own `clawd` user with state in /var/lib/clawd and the socket at
/run/clawd/clawd.sock (group `clawd`: local apps join it); user mode runs it in the user's manager
with the platformdirs locations.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from clawctl.errors import ClawError
from clawctl.fsutil import atomic_write
from clawctl.paths import SYSTEM_SOCKET
from clawctl.resources import bundled_dir

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CONFIG = Path("/etc/clawd/clawd.toml")
SERVICE_USER = "clawd"


@dataclass(frozen=True)
class RenderedFile:
    target: Path
    text: str


def _clawd_executable() -> str:
    found = Path(sys.executable).parent / "clawd"
    return str(found if found.exists() else (shutil.which("clawd") or "/usr/local/bin/clawd"))


def user_unit_dir() -> Path:
    return Path.home() / ".config" / "systemd" / "user"


def render_units(
    user: bool, clawd: str | None = None, distill_policy: str = "cascade"
) -> list[RenderedFile]:
    templates = bundled_dir("daemon")
    clawd = clawd or _clawd_executable()
    clawctl = str(Path(clawd).with_name("clawctl"))
    if user:
        values = {
            "@CLAWD@": clawd,
            "@CLAWCTL@": clawctl,
            "@POLICY@": distill_policy,
            "@STATE_LINES@": "",
            "@CLIENT_ENVIRONMENT@": "",
            "@USER_LINES@": "",
            "@ENVIRONMENT@": "",
            "@SOCKET@": "%t/clawctl/clawd.sock",
            "@SOCKET_GROUP@": "",
            "@WANTED_BY@": "default.target",
        }
        unit_dir = user_unit_dir()
    else:
        values = {
            "@CLAWD@": clawd,
            "@CLAWCTL@": clawctl,
            "@POLICY@": distill_policy,
            "@STATE_LINES@": "StateDirectory=clawd\nStateDirectoryMode=0750",
            "@USER_LINES@": f"User={SERVICE_USER}\nGroup={SERVICE_USER}",
            "@ENVIRONMENT@": f"Environment=CLAW_HOME=/var/lib/clawd\n"
            f"Environment=CLAW_CONFIG={SYSTEM_CONFIG}",
            "@CLIENT_ENVIRONMENT@": f"Environment=CLAW_SOCKET={SYSTEM_SOCKET}",
            "@SOCKET@": str(SYSTEM_SOCKET),
            "@SOCKET_GROUP@": f"SocketGroup={SERVICE_USER}",
            "@WANTED_BY@": "multi-user.target",
        }
        unit_dir = SYSTEM_UNIT_DIR
    rendered = []
    for name in ("clawd.service", "clawd.socket", "clawd-distill.service", "clawd-distill.timer"):
        text = (templates / name).read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace(key, value)
        rendered.append(
            RenderedFile(
                unit_dir / name, "\n".join(line for line in text.splitlines() if line != "") + "\n"
            )
        )
    if not user:
        config = (templates / "clawd.toml").read_text(encoding="utf-8")
        config = config.replace('socket = ""', f'socket = "{SYSTEM_SOCKET}"', 1)
        config = config.replace('socket_group = ""', f'socket_group = "{SERVICE_USER}"', 1)
        rendered.append(RenderedFile(SYSTEM_CONFIG, config))
    return rendered


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ClawError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def install_units(units: list[RenderedFile], user: bool) -> list[str]:
    """Write the files atomically, create the service user, reload systemd. Returns log lines."""
    lines = []
    if not user and shutil.which("useradd"):
        exists = subprocess.run(["id", SERVICE_USER], capture_output=True, check=False)
        if exists.returncode != 0:
            _run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--home-dir",
                    "/var/lib/clawd",
                    SERVICE_USER,
                ]
            )
            lines.append(f"created system user {SERVICE_USER}")
    for unit in units:
        if unit.target.exists() and unit.target.suffix == ".toml":
            lines.append(f"kept existing {unit.target}")
            continue
        try:
            atomic_write(unit.target, unit.text.encode())
        except PermissionError:
            raise ClawError(f"cannot write {unit.target}: run as root or use --user") from None
        lines.append(f"wrote {unit.target}")
    systemctl = ["systemctl", "--user"] if user else ["systemctl"]
    if shutil.which("systemctl"):
        _run([*systemctl, "daemon-reload"])
        lines.append(f"next: {' '.join(systemctl)} enable --now clawd.socket clawd.service")
        lines.append(
            f"off-peak distillation (optional): {' '.join(systemctl)} enable --now "
            "clawd-distill.timer"
        )
    return lines
