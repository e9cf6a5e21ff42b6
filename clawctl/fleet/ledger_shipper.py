"""The fleet ledger: every box's ledger rows in one Postgres table, exactly once.

Each local row has a sequence number that only grows (`ship_seq`); in Postgres a row's key is
(box, seq). The shipper asks Postgres where this box's rows end, then sends the rows after it in
batches, each batch one transaction with `ON CONFLICT DO NOTHING`. So a crash anywhere (before,
during or after a commit) loses nothing and doubles nothing: the next start asks again and
resends from there, and a row that made it already is skipped. Postgres is the only record of
progress, so there is no local state to get out of step with it.

psycopg (3) is the maintained PostgreSQL driver for Python; it is imported on first use, so a box
without a fleet ledger never loads it. The thread runs at the lowest CPU priority and only ever
reads the ledger through its own read-only connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from clawctl.errors import ClawError
from clawctl.ledger import COLUMNS, SUMMARY_COLUMNS, LedgerReader, summary_row
from clawctl.schemas.ledger import GroupBy, SummaryRow

log = logging.getLogger("clawd.fleet")
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
TABLE = "claw_ledger"
_TYPES = {
    "request_id": "TEXT NOT NULL", "ts": "DOUBLE PRECISION NOT NULL", "uid": "INTEGER",
    "pid": "INTEGER", "app": "TEXT", "endpoint": "TEXT NOT NULL", "model": "TEXT NOT NULL",
    "policy": "TEXT", "tier_path": "TEXT NOT NULL", "prompt_tokens": "INTEGER NOT NULL",
    "completion_tokens": "INTEGER NOT NULL", "usage_by_tier": "JSONB NOT NULL",
    "prefill_tokens_saved": "INTEGER NOT NULL", "prefix_source": "TEXT",
    "remote_cost": "DOUBLE PRECISION NOT NULL", "all_remote_cost": "DOUBLE PRECISION NOT NULL",
    "latency_ms": "DOUBLE PRECISION NOT NULL", "escalation_reason": "TEXT",
    "finish_reason": "TEXT NOT NULL", "cached": "TEXT", "tokens_saved": "INTEGER NOT NULL",
    "cost_saved": "DOUBLE PRECISION NOT NULL",
}  # fmt: skip
CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (box TEXT NOT NULL, seq BIGINT NOT NULL, "
    + ", ".join(f"{c} {_TYPES[c]}" for c in COLUMNS)
    + ", PRIMARY KEY (box, seq))"
)
INSERT = (
    f"INSERT INTO {TABLE} (box, seq, {', '.join(COLUMNS)}) VALUES "
    f"(%s, %s, {', '.join('%s' for _ in COLUMNS)}) ON CONFLICT DO NOTHING"
)


class FleetLedgerError(ClawError):
    """The fleet ledger's Postgres could not be reached or refused a query."""

    http_status = 503
    code = "fleet_ledger_unavailable"


def _connect(dsn: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(dsn, connect_timeout=5)
    except psycopg.Error as exc:
        raise FleetLedgerError(f"fleet ledger: cannot connect: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _ensure_table(db: Any) -> None:
    import psycopg

    try:
        with db.transaction():
            db.execute(CREATE)
    except psycopg.errors.UniqueViolation:  # another box created it at the same moment
        db.rollback()


class LedgerShipper:
    def __init__(self, ledger_path: Path, dsn: str, box: str, batch: int, interval: float) -> None:
        self.ledger_path = ledger_path
        self.box = box
        self.batch = batch
        self.interval = interval
        self.shipped = 0  # rows this process sent that Postgres did not have yet
        self.position: int | None = None  # the last sequence number Postgres holds for us
        self.last_error: str | None = None
        self._dsn = dsn
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ledger-shipper", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """A row was written: ship it without waiting for the interval."""
        with self._wake:
            self._wake.notify_all()

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` (a nudge ends it early); True when stopping."""
        with self._wake:
            if not self._stopping:
                self._wake.wait(seconds)
            return self._stopping

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        backoff = FIRST_BACKOFF
        reader: LedgerReader | None = None
        while not self._stopping:
            try:
                reader = reader or LedgerReader(self.ledger_path)
                self._ship(reader)
            except Exception as exc:  # Postgres down, a network cut, a disk error: try again
                self.last_error = exc.message if isinstance(exc, ClawError) else _first_line(exc)
                log.warning("fleet ledger: %s (retrying in %.0f s)", self.last_error, backoff)
                if self._wait(backoff):
                    break
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
        if reader is not None:
            reader.close()

    def _ship(self, reader: LedgerReader) -> None:
        import psycopg
        from psycopg.types.json import Jsonb

        with _connect(self._dsn) as db:
            _ensure_table(db)
            row = db.execute(
                f"SELECT COALESCE(MAX(seq), 0) FROM {TABLE} WHERE box = %s", (self.box,)
            ).fetchone()
            db.commit()
            self.position = int(row[0])
            self.last_error = None
            while not self._stopping:
                rows = reader.after(self.position, self.batch)
                if rows:
                    values = []
                    for seq, entry in rows:
                        data = entry.model_dump()
                        data["usage_by_tier"] = Jsonb(data["usage_by_tier"])
                        values.append((self.box, seq, *(data[c] for c in COLUMNS)))
                    try:
                        with db.transaction(), db.cursor() as cursor:
                            cursor.executemany(INSERT, values)
                            sent = cursor.rowcount
                    except psycopg.Error as exc:
                        raise FleetLedgerError(f"fleet ledger: {_first_line(exc)}") from None
                    self.position = rows[-1][0]
                    self.shipped += max(sent, 0)
                if len(rows) < self.batch and self._wait(self.interval):
                    return

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout)


def fleet_summary(dsn: str, by: GroupBy | str, since: float | None) -> list[SummaryRow]:
    """The fleet's totals, grouped as `clawctl ledger summary` groups one box's (and by box)."""
    import psycopg

    key = {
        "app": "COALESCE(app, '-')",
        "tier": "tier_path",
        "model": "model",
        "day": "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "box": "box",
    }[by]
    query = f"SELECT {key}, {SUMMARY_COLUMNS} FROM {TABLE} WHERE ts >= %s GROUP BY 1 ORDER BY 1"
    with _connect(dsn) as db:
        try:
            _ensure_table(db)
            records = db.execute(query, (since or 0.0,)).fetchall()
        except psycopg.Error as exc:
            raise FleetLedgerError(f"fleet ledger: {_first_line(exc)}") from None
    return [summary_row(r) for r in records]
