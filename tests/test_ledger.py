"""The token ledger: named migrations, rows from real requests equal to their usage, summaries
and exports through the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from clawctl.cli import app
from clawctl.ledger import MIGRATIONS, Ledger, LedgerRow, migrate
from tests.conftest import Daemon, run_cli, run_daemon


def _row(request_id: str, app: str, ts: float, prompt: int = 10, saved: int = 0) -> LedgerRow:
    return LedgerRow(
        request_id=request_id,
        ts=ts,
        uid=1000,
        pid=42,
        app=app,
        endpoint="chat",
        model="smollm2-135m",
        prompt_tokens=prompt,
        completion_tokens=5,
        usage_by_tier={"local": [prompt, 5]},
        prefill_tokens_saved=saved,
        prefix_source=None,
        latency_ms=12.5,
        finish_reason="stop",
    )


def test_migrations_are_named_applied_once_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        assert migrate(db) == []  # already applied
        names = [n for (n,) in db.execute("SELECT name FROM migrations ORDER BY name")]
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert names == [name for name, _ in MIGRATIONS]
    assert mode == "wal"


def test_summary_export_and_retention(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    now = time.time()
    ledger.record(_row("a", "editor", now, prompt=100, saved=80))
    ledger.record(_row("b", "editor", now, prompt=50))
    ledger.record(_row("c", "agent", now - 10 * 86400, prompt=7))
    by_app = {r.key: r for r in ledger.summary("app")}
    assert by_app["editor"].requests == 2
    assert by_app["editor"].prompt_tokens == 150
    assert by_app["editor"].prefill_tokens_saved == 80
    assert [r.key for r in ledger.summary("app", since=now - 86400)] == ["editor"]
    rows = list(csv.DictReader(io.StringIO(ledger.export("csv"))))
    assert [r["request_id"] for r in rows] == ["c", "a", "b"]
    assert json.loads(ledger.export("json"))[1]["usage_by_tier"] == {"local": [100, 5]}
    assert ledger.prune(retention_days=5) == 1
    assert [r.request_id for r in ledger.rows()] == ["a", "b"]
    ledger.close()


def ledger_cli(daemon: Daemon, *args: str) -> Result:
    """`clawctl ledger …` in-process, as a user whose own CLAW_HOME is empty: only the daemon
    (through its socket) knows the rows."""
    return CliRunner().invoke(app, ["ledger", *args], env={"CLAW_SOCKET": str(daemon.socket)})


@pytest.mark.integration
def test_rows_equal_the_usage_in_responses(
    fresh_home: Path, short_dir: Path, tmp_path: Path
) -> None:
    with run_daemon(fresh_home, short_dir / "l.sock", tmp_path) as daemon:
        replies = [daemon.complete(f"Count to {n}:", app="counter") for n in (3, 4)]
        replies.append(daemon.complete("Say hi.", app="greeter"))
        exported = json.loads(ledger_cli(daemon, "export", "--format", "json").stdout)
        summary = json.loads(ledger_cli(daemon, "summary", "--by", "app", "--json").stdout)
        chart = ledger_cli(daemon, "summary", "--since", "1d")
        bad_span = ledger_cli(daemon, "summary", "--since", "yesterday")
    by_id = {row["request_id"]: row for row in exported}
    for reply in replies:
        row = by_id[reply["claw"]["request_id"]]
        assert row["prompt_tokens"] == reply["usage"]["prompt_tokens"]
        assert row["completion_tokens"] == reply["usage"]["completion_tokens"]
        assert row["prefill_tokens_saved"] == reply["claw"]["prefill_tokens_saved"]
        assert row["uid"] == os.getuid()
        assert row["pid"] == os.getpid()
        assert row["model"] == "smollm2-135m"
    counter = next(r for r in summary if r["key"] == "counter")
    assert counter["requests"] == 2
    assert counter["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in replies[:2])
    assert chart.exit_code == 0
    assert "greeter" in chart.stdout
    assert "per day" in chart.stdout
    assert bad_span.exit_code == 2


def test_without_a_daemon_the_ledger_commands_say_how_to_start_one(short_dir: Path) -> None:
    # A subprocess: httpcore leaves the socket of a failed Unix connect to the garbage collector.
    env = {**os.environ, "CLAW_SOCKET": str(short_dir / "none.sock")}
    done = run_cli("ledger", "summary", env=env)
    assert done.returncode == 3
    assert "clawctl serve" in done.stderr
