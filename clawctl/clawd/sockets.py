"""Listening sockets for clawd, bound by clawd itself.

uvicorn's `uds=` chmods the socket to 0666; we create it under a restrictive umask, then set the
configured mode and group, so only the service's group can talk to the daemon. A socket file left
by a crashed daemon is removed; one that answers belongs to a live daemon and we refuse to start.
systemd socket activation (LISTEN_FDS) hands us the socket instead.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path

from clawctl.config import DaemonConfig
from clawctl.errors import DaemonStartupError

SD_LISTEN_FDS_START = 3
AF_UNIX_PATH_MAX = 107


def _live_daemon_at(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def bind_unix(path: Path, mode: int, group: str | None) -> socket.socket:
    if len(os.fsencode(path)) > AF_UNIX_PATH_MAX:
        raise DaemonStartupError(f"socket path is too long for AF_UNIX: {path}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise DaemonStartupError(f"{path} exists and is not a socket; move it away")
        if _live_daemon_at(path):
            raise DaemonStartupError(f"another clawd is already serving {path}")
        path.unlink()  # stale: its daemon is gone
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonStartupError(f"socket_group {group!r} does not exist") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise DaemonStartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if gid != -1:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DaemonStartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def activated_sockets(config: DaemonConfig) -> list[socket.socket]:
    """Sockets passed by systemd socket activation, if they are meant for this process."""
    env = config.systemd
    if env.listen_fds <= 0 or env.listen_pid != os.getpid():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + env.listen_fds):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def listening_sockets(config: DaemonConfig) -> tuple[list[socket.socket], Path | None]:
    """All sockets clawd serves; the second value is the socket file clawd owns (to unlink)."""
    activated = activated_sockets(config)
    if activated:
        owned = None
        sockets = activated
    else:
        sockets = [bind_unix(config.socket_path, config.socket_mode, config.socket_group)]
        owned = config.socket_path
    if config.tcp_host is not None and config.tcp_port is not None:
        try:
            sockets.append(bind_tcp(config.tcp_host, config.tcp_port))
        except DaemonStartupError:
            for sock in sockets:
                sock.close()
            if owned is not None:
                with contextlib.suppress(OSError):
                    owned.unlink()
            raise
    return sockets, owned
