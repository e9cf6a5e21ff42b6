"""clawd as a process: socket ownership, SIGTERM drain, sd_notify, TCP with a token, socket
activation, cancellation on disconnect, keep-alive unloading."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    BIN,
    TEST_PROFILE,
    Daemon,
    clean_env,
    free_port,
    run_daemon,
    wait_healthy,
)

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"


def _chat(client: httpx.Client, content: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def test_second_daemon_refuses_live_socket(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    sock = short_dir / "s.sock"
    with run_daemon(session_home, sock, tmp_path):
        second = subprocess.run(
            [str(BIN / "clawd")],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(CLAW_HOME=str(session_home), CLAW_SOCKET=str(sock)),
        )
        assert second.returncode == 3
        assert "already serving" in second.stderr
        assert "Traceback" not in second.stderr
        assert sock.exists()


def _clawd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "clawd"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_help_lists_the_options(tmp_path: Path) -> None:
    done = _clawd("--help", env=clean_env(CLAW_HOME=str(tmp_path)))
    assert done.returncode == 0
    for option in (
        "--socket PATH",
        "--config FILE",
        "--profile NAME",
        "--tcp HOST:PORT",
        "--token-file FILE",
        "--log-level LEVEL",
        "--version",
        "CLAW_HOME",
    ):
        assert option in done.stdout, option
    version = _clawd("--version", env=clean_env(CLAW_HOME=str(tmp_path)))
    assert version.returncode == 0
    assert version.stdout.startswith("clawd ")


@pytest.mark.parametrize(
    "args",
    [("--bogus",), ("--socket", "./x.sock", "--bogus"), ("stray",), ("--log-level", "loud")],
)
def test_bad_usage_exits_2_with_usage_and_serves_nothing(
    args: tuple[str, ...], short_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    done = _clawd(*args, env=clean_env(CLAW_HOME=str(home), CLAW_SOCKET=str(short_dir / "d.sock")))
    assert done.returncode == 2
    assert done.stderr.startswith("usage: clawd")
    assert "Traceback" not in done.stderr
    assert list(short_dir.iterdir()) == []  # no daemon started on the default socket
    assert not home.exists()  # nor touched its data dir


def test_bad_tcp_address_and_missing_token_file_exit_2(short_dir: Path, tmp_path: Path) -> None:
    env = clean_env(CLAW_HOME=str(tmp_path / "home"), CLAW_SOCKET=str(short_dir / "d.sock"))
    bad = _clawd("--tcp", "nowhere", env=env)
    assert bad.returncode == 2
    assert "HOST:PORT" in bad.stderr
    missing = _clawd("--tcp", "127.0.0.1:9", "--token-file", str(tmp_path / "none"), env=env)
    assert missing.returncode == 2
    assert "token file" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_command_line_options_override_the_environment(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    """--socket wins over CLAW_SOCKET, --tcp/--token-file switch TCP on, --profile wins over
    CLAW_PROFILE: the daemon really serves where the command line says."""
    sock, ignored, port = short_dir / "opt.sock", short_dir / "env.sock", free_port()
    (tmp_path / "token").write_text("opt-token\n")
    env = clean_env(CLAW_HOME=str(session_home), CLAW_SOCKET=str(ignored), CLAW_PROFILE="nope")
    log = tmp_path / "opt.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(BIN / "clawd"), "--socket", str(sock), "--profile", TEST_PROFILE,
             "--tcp", f"127.0.0.1:{port}", "--token-file", str(tmp_path / "token"),
             "--log-level", "debug"],
            env=env,
            stdout=sink,
            stderr=sink,
        )  # fmt: skip
    daemon = Daemon(proc, sock, session_home, log)
    try:
        wait_healthy(daemon)
        assert not ignored.exists()
        with daemon.client() as client:
            assert client.get("/health").json()["profile"] == TEST_PROFILE
        tcp = httpx.get(
            f"http://127.0.0.1:{port}/health", headers={"Authorization": "Bearer opt-token"}
        )
        assert tcp.status_code == 200
    finally:
        assert daemon.stop() == 0
    assert "'log_level': 'debug'" in daemon.log_text()


def test_a_second_daemon_refuses_before_touching_the_data_dir(
    fresh_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    """A second clawd on the same socket, or on another socket with the same data dir, exits 3
    without sweeping the first one's in-flight snapshot temp files."""
    sock = short_dir / "first.sock"
    in_flight = fresh_home / "data" / "snapshots" / "named" / ".being-written.snap.tmp"
    with run_daemon(fresh_home, sock, tmp_path) as first:
        in_flight.parent.mkdir(parents=True, exist_ok=True)
        in_flight.write_bytes(b"half a snapshot")
        env = clean_env(CLAW_HOME=str(fresh_home), CLAW_PROFILE=TEST_PROFILE)
        same_socket = _clawd("--socket", str(sock), env=env)
        other_socket = _clawd("--socket", str(short_dir / "second.sock"), env=env)
        assert same_socket.returncode == 3
        assert "already serving" in same_socket.stderr
        assert other_socket.returncode == 3
        assert f"pid {first.proc.pid}" in other_socket.stderr
        assert "data dir" in other_socket.stderr
        assert "Traceback" not in same_socket.stderr + other_socket.stderr
        assert in_flight.exists()
        assert not (short_dir / "second.sock").exists()  # the refused one cleaned up after itself
        with first.client() as client:
            assert client.get("/health").status_code == 200
    # The file is one clawd does sweep when it starts with the data dir to itself.
    with run_daemon(fresh_home, sock, tmp_path):
        assert not in_flight.exists()


def test_stale_socket_is_replaced(session_home: Path, short_dir: Path, tmp_path: Path) -> None:
    sock = short_dir / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    with run_daemon(session_home, sock, tmp_path) as daemon, daemon.client() as client:
        assert client.get("/health").status_code == 200


def test_sigterm_finishes_in_flight_request_then_exits_zero(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    with run_daemon(session_home, short_dir / "s.sock", tmp_path) as daemon:
        with daemon.client() as client:  # load the model first so the request is mid-decode
            assert _chat(client, "hi", max_tokens=2).status_code == 200
        result: dict[str, httpx.Response] = {}

        def long_request() -> None:
            with daemon.client() as client:
                result["r"] = _chat(
                    client, "Write a long story about a robot.", max_tokens=200, temperature=0
                )

        worker = threading.Thread(target=long_request)
        worker.start()
        with daemon.client() as client:  # SIGTERM once the request is being decoded
            deadline = time.monotonic() + 60
            while not any(m["active_requests"] for m in client.get("/health").json()["loaded"]):
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.02)
        daemon.proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert daemon.proc.wait(60) == 0
        response = result["r"]
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] > 20
        assert not daemon.socket.exists()


def test_a_client_that_leaves_during_a_long_prefill_stops_it(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    """The prompt is computed in steps that observe cancellation: a client that hangs up on a
    long prompt frees the model within a step, and SIGTERM then exits at once, rather than
    after the whole prefill."""
    with run_daemon(session_home, short_dir / "s.sock", tmp_path) as daemon:
        with daemon.client() as client:  # load the model first
            assert _chat(client, "hi", max_tokens=2).status_code == 200
        content = "Summarise these readings: " + "pump rpm 1200 temp 65; " * 300
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": content}],
             "max_tokens": 8, "stream": True, "claw": {"cache": False}}
        ).encode()  # fmt: skip
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: clawd\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        caller.connect(str(daemon.socket))
        caller.sendall(head + body)

        def loaded(client: httpx.Client) -> dict[str, int]:
            (model,) = client.get("/health").json()["loaded"]
            return dict(model)

        with daemon.client() as client:
            deadline = time.monotonic() + 120
            while loaded(client)["kv_cells_used"] < 600:  # the prefill is under way
                assert time.monotonic() < deadline, "the prefill never started"
                time.sleep(0.05)
            caller.close()  # the caller gives up
            while (model := loaded(client))["active_requests"]:
                assert time.monotonic() < deadline, "the prefill was not stopped"
                time.sleep(0.05)
        assert model["kv_cells_used"] < 3000  # stopped part way through the ~3,600 tokens
        assert "cancelled (client went away" in daemon.log_text()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0


def test_sd_notify_ready_watchdog_stopping(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    notify_path = short_dir / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    messages: list[str] = []
    try:
        with run_daemon(
            session_home,
            short_dir / "s.sock",
            tmp_path,
            NOTIFY_SOCKET=str(notify_path),
            WATCHDOG_USEC="400000",
        ) as daemon:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
                messages.append(listener.recv(4096).decode())
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(30) == 0
            while not any("STOPPING=1" in m for m in messages):
                messages.append(listener.recv(4096).decode())
    finally:
        listener.close()
    joined = "\n".join(messages)
    assert "READY=1" in joined
    assert "STATUS=serving on" in joined
    assert joined.index("READY=1") < joined.index("STOPPING=1")
    assert "WATCHDOG=1" in joined


def test_tcp_is_opt_in_and_needs_the_token(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    config = tmp_path / "clawd.toml"
    config.write_text(f'[tcp]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n')
    with run_daemon(session_home, short_dir / "s.sock", tmp_path, CLAW_CONFIG=str(config)) as d:
        url = f"http://127.0.0.1:{port}"
        missing = httpx.get(f"{url}/v1/models")
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        right = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret-token"})
        assert missing.status_code == 401
        assert wrong.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert right.status_code == 200
        with d.client() as unix:  # the socket needs no token
            assert unix.get("/v1/models").status_code == 200


def test_tcp_without_token_refuses_to_start(
    session_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "clawd.toml"
    config.write_text(f'[tcp]\nlisten = "127.0.0.1:{free_port()}"\n')
    done = subprocess.run(
        [str(BIN / "clawd")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(
            CLAW_HOME=str(session_home),
            CLAW_SOCKET=str(short_dir / "s.sock"),
            CLAW_CONFIG=str(config),
        ),
    )
    assert done.returncode == 2  # a bad config is bad input
    assert "token" in done.stderr
    assert "Traceback" not in done.stderr


def test_socket_activation(session_home: Path, short_dir: Path, tmp_path: Path) -> None:
    path = short_dir / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    os.set_inheritable(listener.fileno(), True)
    # As systemd does: the socket on fd 3, LISTEN_PID set to the pid that exec keeps.
    launcher = (
        f"import os; os.dup2({listener.fileno()}, 3); os.environ['LISTEN_PID'] = str(os.getpid());"
        f" os.environ['LISTEN_FDS'] = '1'; os.execv({str(BIN / 'clawd')!r}, ['clawd'])"
    )
    env = clean_env(
        CLAW_HOME=str(session_home),
        CLAW_SOCKET=str(short_dir / "unused.sock"),
        CLAW_PROFILE=TEST_PROFILE,
    )
    log = tmp_path / "act.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher],
            env=env,
            stdout=sink,
            stderr=sink,
            pass_fds=(listener.fileno(),),
        )
    listener.close()
    daemon = Daemon(proc, path, session_home, log)
    try:
        wait_healthy(daemon)
        assert not (short_dir / "unused.sock").exists()
    finally:
        assert daemon.stop() == 0


def test_disconnect_cancels_generation(daemon_with_short_keepalive: Daemon) -> None:
    daemon = daemon_with_short_keepalive
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 2000,
        "temperature": 0.9,
        "messages": [{"role": "user", "content": "Tell me an endless story."}],
    }
    with daemon.client() as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i > 5:
                    break
        cancelled = 'clawd_requests_total{endpoint="chat",status="499"}'
        deadline = time.monotonic() + 60
        while cancelled not in client.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cancelled in client.get("/metrics").text
    assert "cancelled" in daemon.log_text()


def test_keep_alive_zero_unloads_after_request(daemon_with_short_keepalive: Daemon) -> None:
    with daemon_with_short_keepalive.client() as client:
        reply = _chat(client, "hi", max_tokens=2, claw={"keep_alive": 0})
        assert reply.status_code == 200
        deadline = time.monotonic() + 10
        while client.get("/health").json()["loaded"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/health").json()["loaded"] == []


@pytest.fixture
def daemon_with_short_keepalive(session_home: Path, short_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    config = tmp_path / "clawd.toml"
    config.write_text("[daemon]\nkeep_alive_seconds = 60\n")
    with run_daemon(session_home, short_dir / "s.sock", tmp_path, CLAW_CONFIG=str(config)) as d:
        yield d


def test_health_reports_json_shape(daemon_with_short_keepalive: Daemon) -> None:
    with daemon_with_short_keepalive.client() as client:
        health = client.get("/health").json()
    assert health["version"]
    assert health["pid"] == daemon_with_short_keepalive.proc.pid
    assert json.dumps(health)
