"""`clawctl models …` through a real clawd: the CLI (in-process, Typer's CliRunner) reaches the
daemon's store only through `/admin/models…`; uploads, pulls and quantizations run as the
daemon's build operations and stream NDJSON; names that are paths are refused; no daemon, exit 3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from clawctl.cli import app
from clawctl.client import ClawClient
from clawctl.config import load_client_config
from clawctl.schemas.models import AddRequest
from tests.conftest import Daemon, copy_home, run_cli, serve

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def clawd(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on a home of its own (the session's model, hard-linked), shared by the module:
    each test leaves the store as it found it."""
    home = copy_home(session_home, tmp_path_factory.mktemp("models-home"))
    with serve(home, tmp_path_factory.mktemp("log")) as daemon:
        yield daemon


def cli(daemon: Daemon, *args: str) -> Result:
    return CliRunner().invoke(app, ["models", *args], env={"CLAW_SOCKET": str(daemon.socket)})


def names(daemon: Daemon) -> list[str]:
    listed = cli(daemon, "list", "--json")
    assert listed.exit_code == 0, listed.output
    return [m["name"] for m in json.loads(listed.stdout)]


def leftovers(daemon: Daemon) -> list[Path]:
    """Temp files of uploads or builds in the daemon's blobs dir."""
    return list((daemon.home / "data" / "models" / "blobs").glob(".partial-*"))


def test_upload_list_show_verify_rm(clawd: Daemon, smollm2_gguf: Path) -> None:
    assert names(clawd) == [MODEL]
    shown = cli(clawd, "show", MODEL)
    assert shown.exit_code == 0, shown.output
    assert "Q4_1" in shown.stdout
    added = cli(clawd, "add", str(smollm2_gguf), "--name", "tiny", "--json")
    assert added.exit_code == 0, added.output
    manifest = json.loads(added.stdout)
    assert manifest["gguf"]["architecture"] == "llama"
    assert manifest["source"] == f"upload:{smollm2_gguf.name}"
    assert names(clawd) == [MODEL, "tiny"]
    assert leftovers(clawd) == []
    verified = cli(clawd, "verify", "--json")
    assert verified.exit_code == 0, verified.output
    assert {r["name"]: r["ok"] for r in json.loads(verified.stdout)} == {MODEL: True, "tiny": True}
    removed = cli(clawd, "rm", "tiny")
    assert removed.exit_code == 0, removed.output
    assert "removed tiny" in removed.stderr
    missing = cli(clawd, "show", "tiny")
    assert missing.exit_code == 2
    assert "not installed" in missing.stderr
    # the blob both names shared is still there for the other one
    assert cli(clawd, "verify", MODEL).exit_code == 0


def test_add_by_a_path_the_daemon_reads(
    clawd: Daemon, smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAW_SOCKET", str(clawd.socket))
    seen: list[str] = []

    class Recorder:
        def start(self, description: str, total: int | None) -> None:
            seen.append(description)

        def advance(self, amount: int) -> None:
            pass

        def status(self, text: str) -> None:
            pass

        def message(self, text: str, level: str) -> None:
            pass

    with ClawClient(load_client_config()) as client:
        manifest = client.add_model(AddRequest(path=str(smollm2_gguf), name="bypath"), Recorder())
        assert manifest.source == f"file:{smollm2_gguf}"
        assert seen == ["importing bypath"]
        assert client.remove_model("bypath").name == "bypath"
    with clawd.client() as http:
        relative = http.post("/admin/models/add", json={"path": "x.gguf", "name": "rel"})
    assert relative.status_code == 400
    assert "absolute" in relative.json()["error"]["message"]
    assert names(clawd) == [MODEL]


def test_pull_of_a_present_model_is_instant_and_streams_ndjson(clawd: Daemon) -> None:
    pulled = cli(clawd, "pull", MODEL)
    assert pulled.exit_code == 0, pulled.output
    assert f"already present: {MODEL}" in pulled.stderr
    pull = {"ref": MODEL}
    with clawd.client() as http, http.stream("POST", "/admin/models/pull", json=pull) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert lines[-1]["type"] == "result"
    assert lines[-1]["result"]["fetched"] is False
    assert lines[-1]["result"]["manifest"]["name"] == MODEL
    assert all(line["type"] in ("start", "advance", "message") for line in lines[:-1])
    unknown = cli(clawd, "pull", "no-such-model")
    assert unknown.exit_code == 2
    assert "not in the catalog" in unknown.stderr


def test_uploads_that_are_not_gguf_are_refused_and_leave_nothing(
    clawd: Daemon, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>" + b"\0" * (8 << 20))  # more than the socket buffers hold
    refused = cli(clawd, "add", str(junk), "--name", "junk")
    assert refused.exit_code == 2, refused.output
    assert "not a GGUF file" in refused.stderr
    truncated = tmp_path / "broken.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    broken = cli(clawd, "add", str(truncated))
    assert broken.exit_code == 2, broken.output
    assert "Traceback" not in broken.output
    with clawd.client() as http:
        raw = http.post("/admin/models/upload", params={"name": "x"}, content=b"nope")
        unnamed = http.post("/admin/models/upload", content=b"GGUF")
    assert raw.status_code == 400
    assert "not a GGUF file" in raw.json()["error"]["message"]
    assert unnamed.status_code == 400
    assert names(clawd) == [MODEL]
    assert leftovers(clawd) == []


def test_quantize_through_the_daemon(clawd: Daemon) -> None:
    done = cli(clawd, "quantize", MODEL, "--to", "q4_0", "--name", "q", "--json")
    assert done.exit_code == 0, done.output
    manifest = json.loads(done.stdout)
    assert manifest["gguf"]["quant"] == "Q4_0"
    assert manifest["parent"] == MODEL
    again = cli(clawd, "quantize", MODEL, "--to", "q4_0", "--name", "q")
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    unknown = cli(clawd, "quantize", MODEL, "--to", "q3_banana")
    assert unknown.exit_code == 2
    assert "INT2" in unknown.stderr
    onnx_opts = cli(clawd, "quantize", MODEL, "--to", "q4_0", "--block-size", "32")
    assert onnx_opts.exit_code == 2
    assert "ONNX" in onnx_opts.stderr
    assert cli(clawd, "rm", "q").exit_code == 0
    assert names(clawd) == [MODEL]
    assert leftovers(clawd) == []


@pytest.mark.parametrize(
    "args",
    [
        ("show", ".."),
        ("show", "../../etc/passwd"),
        ("show", ".hidden"),
        ("rm", "../x"),
        ("verify", "../x"),
        ("pull", "../x"),
        ("quantize", MODEL, "--to", "q4_0", "--name", "../x"),
        ("convert", "../x", "--to", "onnx-int4"),
    ],
)
def test_names_that_are_paths_are_refused(clawd: Daemon, args: tuple[str, ...]) -> None:
    done = cli(clawd, *args)
    assert done.exit_code == 2, done.output
    assert "invalid model name" in done.stderr


def test_raw_path_names_and_uploads_answer_400(clawd: Daemon, smollm2_gguf: Path) -> None:
    with clawd.client() as http:
        assert http.get("/admin/models/%2E%2E").status_code == 400
        assert http.delete("/admin/models/..%2F..%2Fetc%2Fpasswd").status_code == 400
        upload = http.post("/admin/models/upload", params={"name": "../x"}, content=b"GGUF")
        assert upload.status_code == 400
        missing = http.get("/admin/models/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
    added = cli(clawd, "add", str(smollm2_gguf), "--name", "../x")
    assert added.exit_code == 2
    assert names(clawd) == [MODEL]


def test_without_a_daemon_exit_3(tmp_path: Path, smollm2_gguf: Path) -> None:
    # a subprocess: httpx leaks the socket of a refused Unix connect (a ResourceWarning here)
    env = {**os.environ, "CLAW_SOCKET": str(tmp_path / "none.sock")}
    for args in (("list",), ("add", str(smollm2_gguf))):
        done = run_cli("models", *args, env=env)
        assert done.returncode == 3, (args, done.stderr)
        assert "clawctl serve" in done.stderr
