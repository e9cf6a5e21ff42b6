"""A real PostgreSQL server for tests: Debian's binaries on a temporary data dir and port.

It listens on 127.0.0.1 only (and a socket in its own directory), trusts local connections (a
test server holding test rows), and `stop` ends it whatever state it is in. Postgres refuses to
run as root, so under root the server runs as the `postgres` user, in a directory it owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.conftest import free_port

USER = "claw"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return _binary("initdb") is not None and _binary("postgres") is not None


class Postgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="claw-pg-", dir="/tmp"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._drop: Callable[[], None] | None = None
        if os.geteuid() == 0:  # postgres will not run as root
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            uid, gid = account.pw_uid, account.pw_gid

            def drop() -> None:
                os.setgid(gid)
                os.setuid(uid)

            self._drop = drop

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        sink = log.open("ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                args, stdout=sink, stderr=sink, preexec_fn=self._drop, cwd=self.root
            )
        finally:
            if log:
                sink.close()  # type: ignore[union-attr]

    def start(self, timeout: float = 60.0) -> None:
        data, log = self.root / "data", self.root / "server.log"
        init = self._run(
            str(_binary("initdb")), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
            log=log,
        )  # fmt: skip
        if init.wait(timeout) != 0:
            raise RuntimeError(f"initdb failed:\n{log.read_text()[-3000:]}")
        self.proc = self._run(
            str(_binary("postgres")), "-D", str(data), "-p", str(self.port),
            "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            log=log,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                self.query("SELECT 1")
                return
            time.sleep(0.2)
        told = log.read_text()[-3000:]  # before stop() removes the directory
        self.stop()
        raise RuntimeError(f"postgres did not start:\n{told}")

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, connect_timeout=3) as db:
            return list(db.execute(sql, args or None).fetchall())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # "smart" shutdown; a kill after a while
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()
