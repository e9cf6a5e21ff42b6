"""Freezing and hydrating through a real clawd with the real model: equality with cold prefill,
the prefix pool across restarts, sessions across eviction and restart, refusals, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon, run_cli, run_daemon

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"
DOC = (Path(__file__).resolve().parent.parent / "README.md").read_text()[:3200]
PROMPT = DOC + "\n\nIn one sentence, this project is"


def complete(daemon: Daemon, prompt: str, max_tokens: int = 40, **claw: object) -> dict:  # type: ignore[type-arg]
    return daemon.complete(prompt, max_tokens, **claw)


def chat(daemon: Daemon, messages: list[dict[str, str]], **claw: object) -> dict:  # type: ignore[type-arg]
    with daemon.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": messages,
                "max_tokens": 16,
                "temperature": 0,
                "claw": claw,
            },
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "clawd.toml"
    path.write_text("[snapshots]\npool = false\n")
    return path


@pytest.fixture
def nopool(fresh_home: Path, short_dir: Path, tmp_path: Path, config: Path) -> Iterator[Daemon]:
    with run_daemon(fresh_home, short_dir / "s.sock", tmp_path, CLAW_CONFIG=str(config)) as d:
        yield d


def _evict(daemon: Daemon) -> None:
    """Another prompt takes the context, so nothing of PROMPT is held in memory."""
    complete(daemon, "Unrelated words to take over the context.", max_tokens=2)


def test_hydrated_continuation_equals_cold(nopool: Daemon) -> None:
    cold = complete(nopool, PROMPT)
    _evict(nopool)
    saved = complete(nopool, PROMPT, max_tokens=1, snapshot={"save": "readme"})
    assert saved["claw"]["snapshot_saved"] == "readme"
    _evict(nopool)
    hydrated = complete(nopool, PROMPT, snapshot={"load": "readme"})
    assert hydrated["choices"][0]["text"] == cold["choices"][0]["text"]
    assert hydrated["claw"]["prefix_source"] == "snapshot"
    assert hydrated["claw"]["prefill_tokens_saved"] == hydrated["usage"]["prompt_tokens"] - 1
    assert cold["claw"]["prefill_tokens_saved"] == 0
    _evict(nopool)
    cold_again = complete(nopool, PROMPT)  # also cold after another prompt used the context
    assert cold_again["choices"][0]["text"] == cold["choices"][0]["text"]
    longer = complete(nopool, PROMPT + " a tool", snapshot={"load": "readme"})
    assert longer["claw"]["prefill_tokens_saved"] == hydrated["claw"]["prefill_tokens_saved"]
    assert longer["choices"][0]["text"].strip()


def test_snapshot_refusals(
    nopool: Daemon, fresh_home: Path, short_dir: Path, tmp_path: Path, config: Path
) -> None:
    complete(nopool, PROMPT, max_tokens=1, snapshot={"save": "kv-f16"})
    with nopool.client() as client:
        missing = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "claw": {"snapshot": {"load": "nope"}}},
        )
        traversal = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "claw": {"snapshot": {"save": "../../etc/x"}}},
        )
    assert missing.status_code == 404
    assert traversal.status_code == 400
    snap = fresh_home / "data" / "snapshots" / "named" / "kv-f16.snap"
    # A daemon whose profile uses a q8_0 KV cache must refuse the f16 state: a second box
    # (its own data dir: one clawd per data dir) that was handed the file.
    q8_home = tmp_path / "q8-home"
    shutil.copytree(
        fresh_home / "data" / "models", q8_home / "data" / "models", copy_function=os.link
    )
    (q8_home / "data" / "snapshots" / "named").mkdir(parents=True)
    shutil.copy2(snap, q8_home / "data" / "snapshots" / "named" / snap.name)
    with (
        run_daemon(
            q8_home,
            short_dir / "q8.sock",
            tmp_path,
            CLAW_CONFIG=str(config),
            CLAW_PROFILE="rpi4-4gb",
        ) as q8,
        q8.client() as client,
    ):
        refused = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "claw": {"snapshot": {"load": "kv-f16"}}},
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "snapshot_mismatch"
    assert (
        "type_k" in refused.json()["error"]["message"]
        or "n_ctx" in refused.json()["error"]["message"]
    )
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x40
    snap.write_bytes(bytes(data))
    with nopool.client() as client:
        damaged = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "claw": {"snapshot": {"load": "kv-f16"}}},
        )
        assert damaged.status_code == 500
        assert damaged.json()["error"]["code"] == "integrity_error"
        assert "Traceback" not in damaged.text
        healthy = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        )
    assert healthy.status_code == 200


def test_prefix_pool_skips_prefill_across_restart(
    fresh_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "pool.toml"
    config.write_text("[snapshots]\npool = true\npool_min_tokens = 256\nblock_tokens = 128\n")
    home_env = {"CLAW_CONFIG": str(config)}
    system = [{"role": "system", "content": DOC}]
    with run_daemon(fresh_home, short_dir / "p.sock", tmp_path, **home_env) as first:
        cold = chat(first, [*system, {"role": "user", "content": "What is clawd?"}])
        assert cold["claw"]["prefill_tokens_saved"] == 0
        first.stop()  # the pool write is flushed before exit
    with run_daemon(fresh_home, short_dir / "p.sock", tmp_path, **home_env) as second:
        warm = chat(second, [*system, {"role": "user", "content": "How do I run the tests?"}])
    prompt_tokens = warm["usage"]["prompt_tokens"]
    saved = warm["claw"]["prefill_tokens_saved"]
    assert warm["claw"]["prefix_source"] == "pool"
    assert saved >= 512
    assert prompt_tokens - saved < 128 + 40  # only the question and a partial block evaluated


def test_session_survives_eviction_and_restart(
    fresh_home: Path, short_dir: Path, tmp_path: Path, config: Path
) -> None:
    turn = [{"role": "system", "content": DOC}, {"role": "user", "content": "What is clawd?"}]
    with run_daemon(fresh_home, short_dir / "s.sock", tmp_path, CLAW_CONFIG=str(config)) as d:
        first = chat(d, turn, session="agent-7")
        turn2 = [
            *turn,
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And clawctl?"},
        ]
        _evict(d)  # e.g. another app used the model while the agent waited on a tool
        second = chat(d, turn2, session="agent-7")
        assert second["claw"]["prefix_source"] == "session"
        assert second["claw"]["prefill_tokens_saved"] > 700
        d.stop()
    with run_daemon(fresh_home, short_dir / "s.sock", tmp_path, CLAW_CONFIG=str(config)) as d:
        third = chat(d, turn2, session="agent-7")
    assert third["claw"]["prefix_source"] == "session"
    assert third["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_snapshot_cli(nopool: Daemon, tmp_path: Path) -> None:
    env = dict(os.environ, CLAW_SOCKET=str(nopool.socket), CLAW_HOME=str(nopool.home))
    prompt_file = tmp_path / "doc.txt"
    prompt_file.write_text(PROMPT)
    saved = run_cli(
        "snapshot",
        "save",
        "cli-doc",
        "--model",
        MODEL,
        "--prompt-file",
        str(prompt_file),
        "--json",
        env=env,
    )
    assert saved.returncode == 0, saved.stderr
    info = json.loads(saved.stdout)
    assert info["tokens"] > 700
    assert info["stored_size"] < info["raw_size"]
    listed = json.loads(run_cli("snapshot", "list", "--json", env=env).stdout)
    assert "cli-doc" in [e["name"] for e in listed]
    shown = json.loads(run_cli("snapshot", "show", "cli-doc", "--json", env=env).stdout)
    assert shown["identity"]["type_k"] == "f16"
    loaded = run_cli(
        "snapshot",
        "load",
        "cli-doc",
        "--prompt-file",
        str(prompt_file),
        "--max-tokens",
        "8",
        "--json",
        env=env,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["claw"]["prefix_source"] == "snapshot"
    assert run_cli("snapshot", "verify", env=env).returncode == 0
    exported = tmp_path / "out.snap"
    assert run_cli("snapshot", "export", "cli-doc", str(exported), env=env).returncode == 0
    imported = run_cli("snapshot", "import", str(exported), "--name", "copy", "--json", env=env)
    assert json.loads(imported.stdout)["tokens"] == info["tokens"]
    again = run_cli("snapshot", "import", str(exported), "--name", "copy", env=env)
    assert again.returncode == 2
    junk = tmp_path / "junk.snap"
    junk.write_bytes(b"CLAWSNAP" + b"\x00" * 20)
    refused = run_cli("snapshot", "import", str(junk), env=env)
    assert refused.returncode == 2  # a file that is not a snapshot is bad input
    assert "not a usable clawctl snapshot" in refused.stderr
    assert run_cli("snapshot", "rm", "copy", env=env).returncode == 0
    assert run_cli("snapshot", "show", "copy", env=env).returncode == 2
    bad = run_cli("snapshot", "prune", "--older-than", "soon", env=env)
    assert bad.returncode == 2
    pruned = run_cli("snapshot", "prune", "--older-than", "0s", "--json", env=env)
    assert pruned.returncode == 0
    assert run_cli("snapshot", "rm", "cli-doc", env=env).returncode == 0
    with httpx.Client():
        pass
