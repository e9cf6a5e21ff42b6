"""The real OpenClaw agent on clawd: `openclaw agent --local` (npm `openclaw`, on Node 24 from npm)
with Qwen2.5-Coder-0.5B served over clawd's loopback TCP listener and bearer token, on a task it
can only do with a tool: read a file planted in its workspace and report a value from it.

Opt-in: `make test-agent` installs Node and OpenClaw into the user's cache and sets
`OPENCLAW_BIN` and `OPENCLAW_NODE_DIR` (`.ci/run` runs it after `make test`). The first call
carries OpenClaw's ~12k-token preamble, a few minutes of prefill on 2 cores; the calls after it
reuse that prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clawctl.paths import Paths
from clawctl.store.models import ModelStore
from tests.conftest import DOWNLOAD_CACHE, Daemon, run_cli, serve, tcp_config

pytestmark = pytest.mark.integration
OPENCLAW = os.environ.get("OPENCLAW_BIN", "")
NODE_DIR = os.environ.get("OPENCLAW_NODE_DIR", "")
MODEL = "qwen2.5-coder-0.5b"
TOKEN = "agent-e2e-token"
CODE = "7319"
TURN_SECONDS = 1800  # the agent's own bound: a first call is minutes of prefill on 2 cores

if not OPENCLAW:
    pytest.skip(
        "the real OpenClaw agent runs under `make test-agent` (it installs Node and OpenClaw)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def agent_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    """clawd with Qwen2.5-Coder-0.5B (the agent model: 32k context, native tool calls) on
    127.0.0.1 with a token, as docs/agents.md sets it up for OpenClaw."""
    base = tmp_path_factory.mktemp("agent")
    home = base / "home"
    ModelStore(Paths.build(home, DOWNLOAD_CACHE)).pull(MODEL)
    config, port = tcp_config(base, TOKEN)
    with serve(home, base, CLAW_CONFIG=str(config)) as daemon:
        yield daemon, port


AGENTS_MD = """# AGENTS.md

You answer questions about the files in this workspace.

- Use the `read` tool to read a file the user names.
- When a tool result holds what the user asked for, reply to the user in plain text with the
  answer. Do not call the same tool again for the same file.
"""


def _openclaw_home(root: Path, port: int, workspace: Path) -> Path:
    """A HOME with the OpenClaw configuration docs/agents.md gives for a 0.5B model: greedy
    decoding (repeatable), only the tool the task needs, and the workspace's AGENTS.md in
    place of OpenClaw's first-run bootstrap files. With OpenClaw's full default tool set and
    bootstrap prompt (~12k tokens) Qwen2.5-Coder-0.5B calls tools correctly but keeps calling
    them instead of answering (measured here; bench/agents.py replays that workload)."""
    model = {
        "id": MODEL,
        "name": "Qwen2.5-Coder-0.5B on clawd",
        "reasoning": False,
        "input": ["text"],
        "contextWindow": 32768,
        "maxTokens": 1024,
    }
    config: dict[str, Any] = {
        "models": {
            "providers": {
                "clawd": {
                    "baseUrl": f"http://127.0.0.1:{port}/v1",
                    "apiKey": TOKEN,
                    "api": "openai-completions",
                    "timeoutSeconds": TURN_SECONDS,
                    "models": [model],
                }
            }
        },
        "agents": {
            "defaults": {
                "model": {"primary": f"clawd/{MODEL}"},
                "models": {f"clawd/{MODEL}": {"params": {"temperature": 0}}},
                "workspace": str(workspace),
                "skipBootstrap": True,
            }
        },
        "tools": {"allow": ["read"], "toolSearch": False},
    }
    home = root / "home"
    (home / ".openclaw").mkdir(parents=True)
    (home / ".openclaw" / "openclaw.json").write_text(json.dumps(config, indent=2))
    return home


def _turn(home: Path, session: str, message: str) -> dict[str, Any]:
    """One `openclaw agent --local --json` turn; its JSON result once it is printed.

    OpenClaw 2026.9.6 can stay alive after it printed its result: seen when its SQLite
    maintenance worker failed after a run that needed its "isolated finalization" (the model
    ended a post-tool turn without an answer, and OpenClaw asked again). The result is final
    by then, so once stdout holds a complete JSON document the process gets a bounded time to
    exit and is then stopped; a process that never prints one fails the test at its bound."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLAW_", "OPENCLAW_"))},
        "HOME": str(home),
        "PATH": f"{NODE_DIR}:{os.environ.get('PATH', '')}",
        "NO_COLOR": "1",
    }
    out, err = home / "openclaw.out", home / "openclaw.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [OPENCLAW, "agent", "--local", "--session-id", session, "--message", message, "--json"],
            env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        )  # fmt: skip
        lingered = False
        try:
            result = _await_result(proc, out, TURN_SECONDS + 120)
            try:
                proc.wait(EXIT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:  # printed its result, then lingered
                lingered = True
                proc.terminate()
                proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    assert result is not None, err.read_text()[-4000:]
    assert lingered or proc.returncode == 0, err.read_text()[-4000:]
    return result


EXIT_GRACE_SECONDS = 60


def _await_result(proc: subprocess.Popen[bytes], out: Path, bound: float) -> dict[str, Any] | None:
    """Poll until the process exits or its stdout holds a complete JSON document."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        try:
            parsed = json.loads(out.read_text())
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
        if exited:
            return None
        time.sleep(0.5)
    return None


def test_openclaw_reads_a_file_with_a_tool_and_reports_its_value(
    agent_daemon: tuple[Daemon, int], tmp_path: Path
) -> None:
    daemon, port = agent_daemon
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "heron.txt").write_text(f"Inventory note: the launch code for Heron is {CODE}.\n")
    (workspace / "AGENTS.md").write_text(AGENTS_MD)
    home = _openclaw_home(tmp_path, port, workspace)
    try:
        result = _turn(
            home,
            "e2e",
            "Read the file heron.txt in your workspace and tell me the launch code it contains.",
        )
    finally:
        shutil.copy(daemon.log, tmp_path / "clawd.log")  # kept with the test's files
    meta = result["meta"]["agentMeta"]
    assert meta["provider"] == "clawd"
    assert meta["model"] == MODEL
    # The agent's own record: the read tool ran (a call clawd returned as `tool_calls`) ...
    assert "read" in meta["terminalReceipt"]["successfulToolNames"]
    assert meta["assistantTurns"] >= 2  # the call, then the answer after the tool's result
    # ... and the answer it gave after the tool step holds the file's value.
    answer = " ".join(p.get("text") or "" for p in result["payloads"])
    assert CODE in answer, answer
    # Every call after the first reused the preamble it computed (the ledger's own record).
    exported = run_cli(
        "ledger", "export", "--format", "json", env={**os.environ, "CLAW_HOME": str(daemon.home)}
    )
    assert exported.returncode == 0, exported.stderr
    calls = [
        r for r in json.loads(exported.stdout) if r["model"] == MODEL and r["prompt_tokens"] > 2000
    ]  # the session's calls, each carrying OpenClaw's preamble (not its short side requests)
    assert len(calls) >= 2
    first = calls[0]["prompt_tokens"]
    for row in calls[1:]:
        assert row["prefill_tokens_saved"] >= 0.9 * first, row
