"""The fleet ledger against a real PostgreSQL (Debian's, started on a temporary data dir and a
loopback port): two real clawd boxes ship every ledger row exactly once, across a SIGKILL of one
of them while it ships, and `clawctl ledger summary --fleet` reads the fleet's totals."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, copy_home, run_cli, run_daemon, wait_for
from tests.postgres import Postgres, available, postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    assert available(), "PostgreSQL's server is not installed: apt-get install postgresql"
    with postgres() as server:
        yield server


def _config(directory: Path, pg: Postgres, box: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dsn = directory / "ledger.dsn"
    dsn.write_text(pg.dsn + "\n")
    config = directory / "clawd.toml"
    config.write_text(
        f'[fleet]\nbox_id = "{box}"\nledger_dsn_file = "{dsn}"\nledger_batch = 3\n'
        "ledger_interval_seconds = 0.2\n"
    )
    return config


def _ask(daemon: Daemon, n: int, tag: str) -> None:
    for i in range(n):
        body = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": f"Say {tag} {i}."}],
            "max_tokens": 2,
            "claw": {"cache": False, "app": tag},
        }
        with daemon.client() as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200


def _local_ids(home: Path) -> set[str]:
    with sqlite3.connect(home / "data" / "ledger.db") as db:
        return {r[0] for r in db.execute("SELECT request_id FROM requests")}


def _shipped(pg: Postgres, box: str) -> list[str]:
    rows = pg.query(
        "SELECT request_id FROM claw_ledger WHERE box = %s ORDER BY seq", box
    ) if _has_table(pg) else []  # fmt: skip
    return [r[0] for r in rows]


def _has_table(pg: Postgres) -> bool:
    return bool(pg.query("SELECT to_regclass('claw_ledger') IS NOT NULL")[0][0])


def test_every_row_reaches_the_fleet_ledger_once_across_a_sigkill(
    fresh_home: Path, short_dir: Path, tmp_path: Path, pg: Postgres
) -> None:
    config_a = _config(tmp_path / "a", pg, "box-a")
    with run_daemon(fresh_home, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config_a)) as a:
        _ask(a, 9, "first")
        wait_for("a first batch", lambda: len(_shipped(pg, "box-a")) >= 3)
        a.proc.kill()  # SIGKILL: whatever batch is in flight is cut off
        a.proc.wait(30)
    with run_daemon(fresh_home, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config_a)) as a:
        _ask(a, 4, "second")
        local = _local_ids(fresh_home)
        assert len(local) == 13
        wait_for("every row", lambda: len(_shipped(pg, "box-a")) >= len(local))
        shipped = _shipped(pg, "box-a")
        assert len(shipped) == len(set(shipped)) == len(local)  # none lost, none doubled
        assert set(shipped) == local

        home_b = copy_home(fresh_home, tmp_path / "home-b")
        config_b = _config(tmp_path / "b", pg, "box-b")
        with run_daemon(home_b, short_dir / "b.sock", tmp_path, CLAW_CONFIG=str(config_b)) as b:
            _ask(b, 2, "other-box")
            wait_for("box B's rows", lambda: len(_shipped(pg, "box-b")) == 2)
        env = dict(os.environ, CLAW_SOCKET=str(a.socket), CLAW_HOME=str(a.home))
        result = run_cli("ledger", "summary", "--fleet", "--by", "box", "--json", env=env)
        assert result.returncode == 0, result.stderr
        totals = {row["key"]: row["requests"] for row in json.loads(result.stdout)}
        assert totals == {"box-a": 13, "box-b": 2}
        by_app = run_cli("ledger", "summary", "--fleet", "--by", "app", "--json", env=env)
        apps = {row["key"]: row["requests"] for row in json.loads(by_app.stdout)}
        assert apps == {"first": 9, "second": 4, "other-box": 2}
        alone = run_cli("ledger", "summary", "--by", "box", env=env)
        assert alone.returncode == 2
        assert "--fleet" in alone.stderr


def test_without_a_fleet_ledger_the_summary_says_how_to_set_one(daemon: Daemon) -> None:
    env = dict(os.environ, CLAW_SOCKET=str(daemon.socket), CLAW_HOME=str(daemon.home))
    result = run_cli("ledger", "summary", "--fleet", env=env)
    assert result.returncode == 2
    assert "ledger_dsn_file" in result.stderr
