"""The daemon owns its routing policies: `clawctl route …` runs in-process (Typer's CliRunner)
against a real clawd whose data dir is not the CLI's CLAW_HOME, so validation, installs,
explanations and calibration all happen in the daemon; bad names, bad files and bad requests
are refused with the line or field at fault, and leave the installed policies as they were."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from clawctl.cli import app
from clawctl.paths import Paths
from tests.conftest import Daemon, copy_home, serve
from tests.test_policy_meter import GOOD

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clawd(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = copy_home(session_home, tmp_path_factory.mktemp("policy-home"))
    with serve(home, tmp_path_factory.mktemp("log")) as daemon:
        yield daemon


@pytest.fixture
def cli(clawd: Daemon, monkeypatch: pytest.MonkeyPatch) -> CliOn:
    monkeypatch.setenv("CLAW_SOCKET", str(clawd.socket))  # CLAW_HOME stays the test's own
    return CliOn()


class CliOn:
    """`clawctl ARGS` in this process, asserting the exit code."""

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


def _installed(daemon: Daemon) -> dict[str, bytes]:
    policies = Paths.build(daemon.home).policies_dir
    return {p.name: p.read_bytes() for p in sorted(policies.glob("*.toml"))}


def test_validate_names_the_line_and_installs_nothing(
    cli: CliOn, clawd: Daemon, tmp_path: Path
) -> None:
    before = _installed(clawd)
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('kind = "remote"', 'kind = "cloud"'))
    refused = cli("route", "validate", str(bad), code=2)
    assert f"{bad}:11:" in refused.stderr
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert "is valid (2 tiers)" in cli("route", "validate", str(good)).stderr
    cli("route", "validate", str(tmp_path / "missing.toml"), code=2)
    assert _installed(clawd) == before


def test_apply_installs_in_the_daemons_config_dir(
    cli: CliOn, clawd: Daemon, tmp_path: Path
) -> None:
    source = tmp_path / "p.toml"
    source.write_text(GOOD)
    cli("route", "apply", str(source))
    assert _installed(clawd)["p.toml"] == GOOD.encode()
    assert not Paths.build(Path(os.environ["CLAW_HOME"])).policies_dir.exists()
    shown = cli.json("route", "show", "p")
    assert isinstance(shown, dict)
    assert [t["kind"] for t in shown["tiers"]] == ["local", "remote"]
    assert "remote" in cli("route", "show", "p").stdout
    listed = cli.json("route", "list")
    assert isinstance(listed, list)
    by_name = {entry["name"]: entry for entry in listed}
    assert by_name["p"]["shipped"] is False
    assert by_name["cascade"]["shipped"] is True
    assert by_name["cascade"]["tiers"] == ["int4", "remote"]
    # a broken file with the same name leaves the installed one as it was
    source.write_text(GOOD.replace('start = "a"', 'start = "zzz"'))
    cli("route", "apply", str(source), code=2)
    assert _installed(clawd)["p.toml"] == GOOD.encode()


def test_explain(cli: CliOn) -> None:
    decision = cli.json("route", "explain", "Is 2 > 1?", "--impact", "low")
    assert isinstance(decision, dict)
    assert decision["rule"] == "low impact"
    assert decision["tiers"][0] == "int4"
    assert decision["escalate"] is False  # low-impact work stays local
    text = cli("route", "explain", "Is 2 > 1?").stdout
    assert "escalate when" in text
    cli("route", "explain", "x", "--policy", "nope", code=2)


def test_refusals_keep_the_api_shape(clawd: Daemon) -> None:
    with clawd.client() as client:
        dots = client.get("/admin/policies/%2E%2E")
        traversal = client.get("/admin/policies/..%2F..%2Fetc%2Fpasswd")  # matches no route
        both = client.post(
            "/admin/policies/cascade/calibrate",
            json={
                "examples": [{"input": [{"role": "user", "content": "hi"}], "ideal": "hi"}],
                "target_remote_rate": 0.5,
                "target_error_rate": 0.1,
            },
        )
        unknown = client.post("/admin/policies/nope/explain", json={"prompt": "x"})
        invalid = client.post("/admin/policies", json={"text": "name = 3", "source": "x.toml"})
    expected = ((dots, 400), (traversal, 404), (both, 400), (unknown, 404), (invalid, 400))
    for response, status in expected:
        assert response.status_code == status, response.text
        assert "message" in response.json()["error"]
    assert "exactly one" in both.json()["error"]["message"]


def test_calibrate_dry_run_reports_and_writes_nothing(
    cli: CliOn, clawd: Daemon, tmp_path: Path
) -> None:
    policy = tmp_path / "tune.toml"
    policy.write_text(GOOD.replace('name = "p"', 'name = "tune"'))
    cli("route", "apply", str(policy))
    before = _installed(clawd)
    data = tmp_path / "mini.jsonl"
    rows = [("Is 9 pounds heavier than 1 pound? Answer Yes or No", "Yes")] * 2 + [
        ("Is 1 pound heavier than 5 pounds? Answer Yes or No", "No")
    ]
    data.write_text(
        "\n".join(
            json.dumps({"input": [{"role": "user", "content": q}], "ideal": a}) for q, a in rows
        )
    )
    args = ("route", "calibrate", "--data", str(data), "--policy", "tune", "--max-tokens", "4")
    report = cli.json(*args, "--target-remote-rate", "0.3", "--dry-run")
    assert isinstance(report, dict)
    assert report["written"] is None
    (tier,) = report["tiers"]
    assert (tier["tier"], tier["model"], tier["examples"]) == ("a", "smollm2-135m", 3)
    assert set(tier["signals"]) >= {"window_entropy", "min_prob", "probe"}
    assert _installed(clawd) == before
    cli(*args, code=2)  # no target
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"input": []}\n')
    assert (
        f"{junk}:1:"
        in cli(*args[:2], "--data", str(junk), "--target-error-rate", "0.1", code=2).stderr
    )
    with clawd.client() as client:
        rows_after = client.get("/admin/ledger/summary", params={"by": "app"}).json()["rows"]
    assert "clawctl-calibrate" in [r["key"] for r in rows_after]
