"""The daemon owns the snapshot and adapter stores: `clawctl snapshot …` and `clawctl adapters …`
run in-process (Typer's CliRunner) against a real clawd whose data dir is not the CLI's own
CLAW_HOME, so every answer here came over the socket. Uploads and exports stream through the
admin routes; damaged, foreign, clashing or badly named inputs are refused and leave the daemon's
stores as they were."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from clawctl.cli import app
from clawctl.client import ClawClient
from clawctl.config import load_client_config
from clawctl.errors import BadInput
from tests.conftest import Daemon, copy_home, run_cli, serve
from tests.test_adapters import make_lora

MODEL = "smollm2-135m"
PROMPT = "Snapshots let an agent skip the prefill of a long and stable prompt. " * 6


@pytest.fixture(scope="module")
def clawd(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real clawd on a home of its own (the model installed; the prefix pool off)."""
    home = copy_home(session_home, tmp_path_factory.mktemp("admin-home"))
    config = home / "clawd.toml"
    config.write_text("[snapshots]\npool = false\n")
    with serve(home, tmp_path_factory.mktemp("log"), CLAW_CONFIG=str(config)) as daemon:
        yield daemon


@pytest.fixture
def cli(clawd: Daemon, monkeypatch: pytest.MonkeyPatch) -> CliRunnerOn:
    monkeypatch.setenv("CLAW_SOCKET", str(clawd.socket))  # CLAW_HOME stays the test's own
    return CliRunnerOn()


class CliRunnerOn:
    """`clawctl ARGS` in this process, asserting the exit code."""

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


def _names(cli: CliRunnerOn) -> list[str]:
    listing = cli.json("snapshot", "list")
    assert isinstance(listing, list)
    return [entry["name"] for entry in listing]


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_without_a_daemon_store_commands_say_how_to_start_one(tmp_path: Path) -> None:
    # A subprocess: httpx leaks the socket of a refused Unix-socket connect.
    env = dict(os.environ, CLAW_SOCKET=str(tmp_path / "none.sock"))
    for args in (("snapshot", "list"), ("adapters", "list")):
        done = run_cli(*args, env=env)
        assert done.returncode == 3, done.stderr
        assert "clawctl serve" in done.stderr


def test_save_list_show_verify_prune_rm(clawd: Daemon, cli: CliRunnerOn, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    saved = cli.json("snapshot", "save", "doc", "--model", MODEL, "--prompt-file", str(prompt))
    assert isinstance(saved, dict)
    assert saved["kind"] == "named"
    assert saved["tokens"] > 50  # the same entry as `snapshot list` and `import`
    assert saved["stored_size"] == (clawd.home / "data/snapshots/named/doc.snap").stat().st_size
    assert "path" not in saved  # the daemon's paths are its own business
    assert "doc" in _names(cli)
    shown = cli.json("snapshot", "show", "doc")
    assert isinstance(shown, dict)
    assert shown["identity"]["model_sha256"] == saved["model_sha256"]
    assert "tokens" not in shown
    assert "doc" in cli("snapshot", "show", "doc").stdout
    assert cli("snapshot", "show", "nope", code=2).stderr

    clawd.complete("A session turn.", max_tokens=2, session="s1")
    deadline = time.monotonic() + 60  # sessions are written behind the response
    while "s1" not in _names(cli):
        assert time.monotonic() < deadline, "the session snapshot was never written"
        time.sleep(0.1)
    verified = cli.json("snapshot", "verify")
    assert isinstance(verified, list)
    assert {(r["name"], r["ok"]) for r in verified} >= {("doc", True), ("s1", True)}

    cli("snapshot", "prune", code=2)  # neither --max-bytes nor --older-than
    cli("snapshot", "prune", "--older-than", "soon", code=2)
    pruned = cli.json("snapshot", "prune", "--older-than", "0s")
    assert pruned == {"removed": ["s1"]}  # named snapshots stay unless --named
    assert _names(cli) == ["doc"]

    assert "removed doc" in cli("snapshot", "rm", "doc").stderr
    cli("snapshot", "rm", "doc", code=2)
    assert _names(cli) == []


def test_export_import_round_trip_and_refusals(
    clawd: Daemon, cli: CliRunnerOn, tmp_path: Path
) -> None:
    clawd.complete(PROMPT, max_tokens=1, snapshot={"save": "orig"})
    named = clawd.home / "data" / "snapshots" / "named"
    exported = tmp_path / "usb" / "orig.snap"
    cli("snapshot", "export", "orig", str(exported))
    assert exported.read_bytes() == (named / "orig.snap").read_bytes()
    assert _leftovers(exported.parent) == []

    imported = cli.json("snapshot", "import", str(exported), "--name", "copy")
    assert isinstance(imported, dict)
    assert imported["name"] == "copy"
    assert (named / "copy.snap").read_bytes() == exported.read_bytes()
    loaded = clawd.complete(PROMPT + " And", max_tokens=2, snapshot={"load": "copy"})
    assert loaded["claw"]["prefix_source"] == "snapshot"

    before = sorted(_names(cli))
    clash = cli("snapshot", "import", str(exported), "--name", "copy", code=2)
    assert "already exists" in clash.stderr
    damaged = tmp_path / "damaged.snap"
    data = bytearray(exported.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    refused = cli("snapshot", "import", str(damaged), "--name", "damaged", code=2)
    assert "not a usable clawctl snapshot" in refused.stderr
    foreign = tmp_path / "foreign.snap"
    foreign.write_bytes(b"CLAWSNAP" + b"\x00" * 20)
    cli("snapshot", "import", str(foreign), code=2)
    cli("snapshot", "import", str(exported), "--name", "../escape", code=2)
    cli("snapshot", "import", str(tmp_path / "missing.snap"), code=2)
    assert sorted(_names(cli)) == before
    assert _leftovers(named) == []
    assert not (clawd.home / "data" / "snapshots" / "escape.snap").exists()

    cli("snapshot", "export", "nope", str(tmp_path / "nope.snap"), code=2)
    assert not (tmp_path / "nope.snap").exists()
    for name in ("orig", "copy"):
        cli("snapshot", "rm", name)


def test_names_with_path_traversal_are_refused(clawd: Daemon, cli: CliRunnerOn) -> None:
    with ClawClient(load_client_config()) as client:
        for bad in ("..", ".hidden", "a..b", "../../etc/passwd"):
            with pytest.raises(BadInput):
                client.show_snapshot(bad)
            with pytest.raises(BadInput):
                client.remove_snapshot(bad)
            with pytest.raises(BadInput):
                client.show_adapter(MODEL, bad)
            with pytest.raises(BadInput):
                client.remove_adapter(bad, "x")
    with clawd.client() as http:
        for path in (
            "/admin/snapshots/import?name=../../etc/x",
            f"/admin/adapters/upload?base={MODEL}&name=../../x",
            "/admin/adapters/upload?base=../../etc",
        ):
            answer = http.post(path, content=b"GGUF")
            assert answer.status_code == 400, (path, answer.text)
        assert http.get("/admin/adapters", params={"base": "../x"}).status_code == 400


@pytest.fixture(scope="module")
def loras(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "zero": make_lora(smollm2_gguf, root / "zero.gguf"),
        "arch": make_lora(smollm2_gguf, root / "arch.gguf", arch="qwen2"),
    }


def test_adapter_upload_install_list_show_verify_rm(
    clawd: Daemon, cli: CliRunnerOn, loras: dict[str, Path]
) -> None:
    blobs = clawd.home / "data" / "models" / "blobs"
    installed = cli.json("adapters", "install", str(loras["zero"]), "--base", MODEL)
    assert isinstance(installed, dict)
    assert installed["name"] == "zero"  # from the uploaded file's name
    assert installed["source"] == "upload:zero.gguf"
    assert installed["rank"] == 8
    assert len(installed["targets"]) == 60
    assert (blobs / f"sha256-{installed['digest']}").is_file()
    listing = cli.json("adapters", "list")
    assert listing == [installed]
    assert cli.json("adapters", "list", "--base", "other") == []
    shown = cli.json("adapters", "show", "zero", "--base", MODEL)
    assert isinstance(shown, dict)
    assert shown["alpha"] == 8.0
    assert cli.json("adapters", "verify") == [{"base": MODEL, "name": "zero", "ok": True}]
    # An adapter in use by requests works at once: the daemon reads manifests per request.
    reply = clawd.complete("The capital of France is", max_tokens=2, adapters=[{"name": "zero"}])
    assert reply["claw"]["adapters"] == [{"name": "zero", "scale": 1.0}]

    wrong_base = cli("adapters", "install", str(loras["arch"]), "--base", MODEL, code=2)
    assert "architecture 'qwen2'" in wrong_base.stderr
    pinned = ("--sha256", "0" * 64, "--name", "pinned")
    cli("adapters", "install", str(loras["zero"]), "--base", MODEL, *pinned, code=1)
    cli("adapters", "install", str(loras["zero"]), "--base", "nope", code=2)
    cli("adapters", "install", str(loras["zero"]) + ".missing", "--base", MODEL, code=2)
    assert cli.json("adapters", "list") == [installed]
    assert _leftovers(blobs) == []

    assert "removed zero" in cli("adapters", "rm", "zero", "--base", MODEL).stderr
    cli("adapters", "show", "zero", "--base", MODEL, code=2)
    assert cli.json("adapters", "list") == []
    assert not (blobs / f"sha256-{installed['digest']}").exists()
