"""The layout of a real install: clawd runs as one system user with its own data dir, and
`clawctl` runs as another user, in the socket's group, with a HOME and CLAW_HOME of its own.

What the CLI shows must be the daemon's data (its models, snapshots and ledger), reached through
the 0660 socket, never stores the CLI opened in its own user's directories. Needs root (it
creates two system users and a group, and removes them afterwards).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, clean_env, wait_healthy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="creates system users and runs clawd and clawctl as them: needs root",
    ),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("useradd", "userdel", "groupdel", "setpriv")),
        reason="needs useradd, userdel, groupdel and setpriv",
    ),
]

GROUP = "clawtest"
DAEMON_USER = "clawtest-d"
CLIENT_USER = "clawtest-c"
MODEL = "smollm2-135m"
SITE = sysconfig.get_paths()["purelib"]  # the venv's site-packages (clawctl is installed there)
# -I -S: no user site, no system site-packages; then the venv's (its .pth adds the checkout).
BOOT = f"import site; site.addsitedir({SITE!r}); "


def _drop_accounts() -> None:
    for user in (DAEMON_USER, CLIENT_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        subprocess.run(["userdel", user], check=False, capture_output=True)
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        return
    subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


@dataclass
class Layout:
    base: Path
    python: str
    daemon_home: Path
    client_home: Path
    config: Path
    socket: Path

    def as_user(self, user: str) -> list[str]:
        return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                "--init-groups", "--"]  # fmt: skip

    def clawd(self, *args: str) -> list[str]:
        code = BOOT + "from clawctl.clawd.main import main; main()"
        return [*self.as_user(DAEMON_USER), self.python, "-I", "-S", "-c", code, *args]

    def clawctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        code = BOOT + "from clawctl.cli import main; main()"
        env = clean_env(
            HOME=str(self.client_home),
            CLAW_HOME=str(self.client_home / "claw"),
            CLAW_SOCKET=str(self.socket),
            CLAW_DOWNLOAD_CACHE=str(self.client_home / "downloads"),
        )
        return subprocess.run(
            [*self.as_user(CLIENT_USER), self.python, "-I", "-S", "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=self.client_home,
            check=False,
        )


def _runs_as(user_cmd: list[str], python: str) -> bool:
    probe = subprocess.run(
        [*user_cmd, python, "-I", "-S", "-c", BOOT + "import clawctl.cli, llama_cpp"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0


def _interpreter(layout_cmd: list[str]) -> str | None:
    """A Python both users can execute that loads the venv's packages: this one, or (when it
    lives in a directory other users cannot enter, e.g. pyenv under /root) the system's
    interpreter of the same version (same ABI for the compiled packages)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")):
        if candidate and _runs_as(layout_cmd, candidate):
            return candidate
    return None


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(Path(directory) / name, uid, gid)


@pytest.fixture
def layout(session_home: Path) -> Iterator[Layout]:
    _drop_accounts()  # leftovers of an interrupted run
    base = Path(tempfile.mkdtemp(prefix="claw-layout-", dir="/tmp"))
    try:
        base.chmod(0o755)
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
        for user in (DAEMON_USER, CLIENT_USER):
            subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home", "--groups", GROUP,
                 "--home-dir", str(base / user), "--shell", "/usr/sbin/nologin", user],
                check=True,
                capture_output=True,
            )  # fmt: skip
        daemon = pwd.getpwnam(DAEMON_USER)
        client = pwd.getpwnam(CLIENT_USER)
        group = grp.getgrnam(GROUP).gr_gid
        # The daemon's own data dir, with the default model installed (copied: its files).
        daemon_home = base / "clawd-home"
        shutil.copytree(session_home / "data" / "models", daemon_home / "data" / "models")
        _chown_tree(daemon_home, daemon.pw_uid, daemon.pw_gid)
        daemon_home.chmod(0o700)
        # Where the socket lives: the daemon's, entered by its group (systemd's RuntimeDirectory).
        run_dir = base / "run"
        run_dir.mkdir()
        os.chown(run_dir, daemon.pw_uid, group)
        run_dir.chmod(0o750)
        config = base / "clawd.toml"
        config.write_text(
            f'[daemon]\nsocket_mode = "0660"\nsocket_group = "{GROUP}"\nprofile = "x86-small"\n'
        )
        config.chmod(0o644)
        client_home = base / "client-home"
        client_home.mkdir()
        os.chown(client_home, client.pw_uid, client.pw_gid)
        client_home.chmod(0o700)
        probe = Layout(base, "", daemon_home, client_home, config, run_dir / "clawd.sock")
        python = _interpreter(probe.as_user(CLIENT_USER))
        if python is None:
            pytest.skip(
                f"no Python that {CLIENT_USER} may execute loads this venv ({sys.executable} "
                "sits in a directory other users cannot enter, and no system python"
                f"{sys.version_info.major}.{sys.version_info.minor} was found)"
            )
        probe.python = python
        yield probe
    finally:
        _drop_accounts()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def service(layout: Layout, tmp_path: Path) -> Iterator[Daemon]:
    """clawd as the daemon user, on the group's socket, with its own CLAW_HOME."""
    env = clean_env(
        HOME=str(layout.daemon_home),
        CLAW_HOME=str(layout.daemon_home),
        CLAW_DOWNLOAD_CACHE=str(layout.daemon_home / "downloads"),
    )
    log = tmp_path / "clawd.log"
    command = layout.clawd("--socket", str(layout.socket), "--config", str(layout.config))
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=sink, cwd=layout.base)
    daemon = Daemon(proc, layout.socket, layout.daemon_home, log)
    try:
        wait_healthy(daemon, timeout=120)
        yield daemon
    finally:
        daemon.stop()


def _rows(document: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in a document (the commands' --json shapes may wrap their lists)."""
    if isinstance(document, dict):
        yield document
        for value in document.values():
            yield from _rows(value)
    elif isinstance(document, list):
        for value in document:
            yield from _rows(value)


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, (done.args[-3:], done.stdout, done.stderr)
    return json.loads(done.stdout)


def test_clawctl_as_another_user_sees_the_daemons_data(layout: Layout, service: Daemon) -> None:
    stat = layout.socket.stat()
    assert stat.st_mode & 0o777 == 0o660
    assert stat.st_uid == pwd.getpwnam(DAEMON_USER).pw_uid
    assert stat.st_gid == grp.getgrnam(GROUP).gr_gid
    # A snapshot the daemon writes into its own data dir (asked over its socket, as root).
    saved = service.complete("The layout test says:", max_tokens=2, snapshot={"save": "layout"})
    assert saved["usage"]["completion_tokens"] >= 1

    models = _json(layout.clawctl("models", "list", "--json"))
    assert MODEL in {row.get("name") for row in _rows(models)}

    chat = layout.clawctl("chat", "Say hello.", "--model", MODEL, "--max-tokens", "4")
    assert chat.returncode == 0, (chat.stdout, chat.stderr)
    assert chat.stdout.strip()

    snapshots = _json(layout.clawctl("snapshot", "list", "--json"))
    assert "layout" in {row.get("name") for row in _rows(snapshots)}

    ledger = _json(layout.clawctl("ledger", "summary", "--by", "model", "--json"))
    [row] = [r for r in _rows(ledger) if r.get("key") == MODEL]
    assert row["requests"] >= 2  # the completion above and the chat

    # The CLI opened no store of its own in its user's directories.
    client_claw = layout.client_home / "claw"
    for store in ("data/ledger.db", "data/snapshots", "data/models"):
        assert not (client_claw / store).exists(), store
    assert (layout.daemon_home / "data" / "ledger.db").is_file()
