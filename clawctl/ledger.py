"""The token ledger: one SQLite row per request, for what each app spent and what caching saved.

SQLite in WAL mode in the data dir; the schema changes only through `MIGRATIONS`, an append-only
list of named steps recorded in the `migrations` table (as simonw/llm does), so a ledger written
by any version opens with any later one. clawd writes (one connection, on its event loop);
`clawctl ledger` asks clawd (/admin/ledger), which reads it. Costs are in the policy's currency
per request; with no routing policy every request is local and costs 0, while
`prefill_tokens_saved` shows what snapshots, sessions and the prefix pool avoided.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from clawctl.schemas.distill import DistillCycle
from clawctl.schemas.ledger import AuditPair, GroupBy, SummaryRow


class LedgerRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    request_id: str
    ts: float
    uid: int | None
    pid: int | None
    app: str | None
    endpoint: str
    model: str
    policy: str | None = None
    tier_path: str = "local"
    prompt_tokens: int
    completion_tokens: int
    usage_by_tier: dict[str, list[int]]
    prefill_tokens_saved: int
    prefix_source: str | None
    remote_cost: float = 0.0
    all_remote_cost: float = 0.0
    latency_ms: float
    escalation_reason: str | None = None
    finish_reason: str
    cached: str | None = None  # "exact", "semantic" or "coalesced": answered without generating
    tokens_saved: int = 0  # prompt + completion tokens the answer cache spared
    cost_saved: float = 0.0  # what generating it would have cost (the original's remote cost)


def _create_requests(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE requests (
            request_id TEXT PRIMARY KEY, ts REAL NOT NULL, uid INTEGER, pid INTEGER, app TEXT,
            endpoint TEXT NOT NULL, model TEXT NOT NULL, policy TEXT, tier_path TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            usage_by_tier TEXT NOT NULL, prefill_tokens_saved INTEGER NOT NULL,
            prefix_source TEXT, remote_cost REAL NOT NULL, all_remote_cost REAL NOT NULL,
            latency_ms REAL NOT NULL, escalation_reason TEXT, finish_reason TEXT NOT NULL)"""
    )
    db.execute("CREATE INDEX requests_ts ON requests (ts)")


class DistillExample(BaseModel):
    """An escalated request with the answer of the tier that took it over: fine-tuning data.
    Kept only when the policy says `store_prompts = true`."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    ts: float
    policy: str
    app: str | None
    tier: str
    messages: list[dict[str, str]]
    answer: str

    def chat_line(self) -> str:
        """One line of a chat-format fine-tuning set (OpenAI / TRL `messages`)."""
        messages = [*self.messages, {"role": "assistant", "content": self.answer}]
        return json.dumps({"messages": messages}, ensure_ascii=False)


def _create_escalations(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE escalations (
            request_id TEXT PRIMARY KEY, ts REAL NOT NULL, policy TEXT NOT NULL, app TEXT,
            tier TEXT NOT NULL, messages TEXT NOT NULL, answer TEXT NOT NULL)"""
    )
    db.execute("CREATE INDEX escalations_ts ON escalations (ts)")


def _add_cache_columns(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE requests ADD COLUMN cached TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN tokens_saved INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE requests ADD COLUMN cost_saved REAL NOT NULL DEFAULT 0")


def _create_ship_sequence(db: sqlite3.Connection) -> None:
    """A number per row that only grows (AUTOINCREMENT never reuses one, even after pruning):
    the fleet shipper's position, and with the box id the fleet ledger's key."""
    db.execute(
        """CREATE TABLE ship_seq (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE)"""
    )
    db.execute("INSERT INTO ship_seq (request_id) SELECT request_id FROM requests ORDER BY ts")


def _create_audits(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE audits (
            request_id TEXT PRIMARY KEY, ts REAL NOT NULL, policy TEXT NOT NULL,
            tier TEXT NOT NULL, next_tier TEXT NOT NULL, features TEXT NOT NULL,
            answer TEXT NOT NULL, next_answer TEXT NOT NULL, agree INTEGER NOT NULL,
            cost REAL NOT NULL)"""
    )
    db.execute("CREATE INDEX audits_policy_ts ON audits (policy, ts)")


def _create_distill_cycles(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE distill_cycles (
            ts REAL NOT NULL, policy TEXT NOT NULL, adapter TEXT, examples INTEGER NOT NULL,
            outcome TEXT NOT NULL, detail TEXT NOT NULL, escalated_before REAL,
            escalated_after REAL, accuracy_before REAL, accuracy_after REAL)"""
    )
    db.execute("CREATE INDEX distill_cycles_policy_ts ON distill_cycles (policy, ts)")


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("m001_requests", _create_requests),
    ("m002_escalations", _create_escalations),
    ("m003_answer_cache", _add_cache_columns),
    ("m004_ship_sequence", _create_ship_sequence),
    ("m005_audits", _create_audits),
    ("m006_distill_cycles", _create_distill_cycles),
]
COLUMNS = list(LedgerRow.model_fields)


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet recorded; returns their names."""
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {name for (name,) in db.execute("SELECT name FROM migrations")}
    applied = []
    for name, step in MIGRATIONS:
        if name in done:
            continue
        with db:
            step(db)
            db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
        applied.append(name)
    return applied


# What `summary` adds up per group, in SQL both SQLite and Postgres run.
SUMMARY_COLUMNS = """COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
    SUM(prefill_tokens_saved), SUM(remote_cost), SUM(all_remote_cost), COUNT(cached),
    SUM(tokens_saved), SUM(cost_saved)"""


def summary_row(record: Sequence[Any]) -> SummaryRow:
    """One group's key and the sums of SUMMARY_COLUMNS."""
    return SummaryRow(
        key=str(record[0]), requests=record[1], prompt_tokens=record[2],
        completion_tokens=record[3], prefill_tokens_saved=record[4], remote_cost=record[5],
        all_remote_cost=record[6], cached=record[7], tokens_saved=record[8],
        cost_saved=record[9],
    )  # fmt: skip


def _row(record: tuple[object, ...]) -> LedgerRow:
    values = dict(zip(COLUMNS, record, strict=True))
    values["usage_by_tier"] = json.loads(str(values["usage_by_tier"]))
    return LedgerRow.model_validate(values)


class LedgerReader:
    """A second, read-only connection for a thread other than clawd's event loop (the fleet
    shipper): WAL lets it read while the ledger writes."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    def after(self, seq: int, limit: int) -> list[tuple[int, LedgerRow]]:
        """Up to `limit` rows whose sequence number is above `seq`, in order."""
        columns = ", ".join(f"r.{c}" for c in COLUMNS)
        query = f"""SELECT s.seq, {columns} FROM ship_seq s JOIN requests r USING (request_id)
                    WHERE s.seq > ? ORDER BY s.seq LIMIT ?"""
        return [(int(r[0]), _row(r[1:])) for r in self._db.execute(query, (seq, limit))]

    def close(self) -> None:
        self._db.close()


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        migrate(self._db)
        self.on_recorded: Callable[[], object] | None = None  # the fleet shipper's nudge

    def close(self) -> None:
        self._db.close()

    def record(self, row: LedgerRow) -> None:
        values = row.model_dump()
        values["usage_by_tier"] = json.dumps(values["usage_by_tier"])
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._db:  # the row and its sequence number commit together
            self._db.execute("BEGIN")
            self._db.execute(
                f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                [values[c] for c in COLUMNS],
            )
            self._db.execute(
                "INSERT OR IGNORE INTO ship_seq (request_id) VALUES (?)", (row.request_id,)
            )
        if self.on_recorded is not None:
            self.on_recorded()

    def record_example(self, example: DistillExample) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO escalations VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                example.request_id,
                example.ts,
                example.policy,
                example.app,
                example.tier,
                json.dumps(example.messages),
                example.answer,
            ),
        )

    def record_audit(self, pair: AuditPair) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO audits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pair.request_id, pair.ts, pair.policy, pair.tier, pair.next_tier,
                json.dumps(pair.features), pair.answer, pair.next_answer, int(pair.agree),
                pair.cost,
            ),
        )  # fmt: skip

    def record_cycle(self, cycle: DistillCycle) -> None:
        """What an off-peak distillation cycle did (`clawctl distill cycle`)."""
        names = list(DistillCycle.model_fields)
        values = tuple(getattr(cycle, name) for name in names)
        self._db.execute(
            f"INSERT INTO distill_cycles ({', '.join(names)}) VALUES "
            f"({', '.join('?' for _ in names)})",
            values,
        )

    def cycles(self, policy: str | None = None, since: float | None = None) -> list[DistillCycle]:
        names = list(DistillCycle.model_fields)
        query = (
            f"SELECT {', '.join(names)} FROM distill_cycles "
            "WHERE ts >= ? AND (? IS NULL OR policy = ?) ORDER BY ts"
        )
        return [
            DistillCycle.model_validate(dict(zip(names, row, strict=True)))
            for row in self._db.execute(query, (since or 0.0, policy, policy))
        ]

    def audits(self, policy: str, since: float | None = None) -> list[AuditPair]:
        query = "SELECT * FROM audits WHERE policy = ? AND ts >= ? ORDER BY ts"
        names = list(AuditPair.model_fields)
        pairs = []
        for row in self._db.execute(query, (policy, since or 0.0)):
            values = dict(zip(names, row, strict=True))
            values["features"] = json.loads(values["features"])
            pairs.append(AuditPair.model_validate(values))
        return pairs

    def examples(
        self, since: float | None = None, policy: str | None = None
    ) -> list[DistillExample]:
        query = "SELECT * FROM escalations WHERE ts >= ? AND (? IS NULL OR policy = ?) ORDER BY ts"
        found = []
        for row in self._db.execute(query, (since or 0.0, policy, policy)):
            request_id, ts, name, app, tier, messages, answer = row
            found.append(
                DistillExample(
                    request_id=request_id,
                    ts=ts,
                    policy=name,
                    app=app,
                    tier=tier,
                    messages=json.loads(messages),
                    answer=answer,
                )
            )
        return found

    def prune(self, retention_days: float) -> int:
        cutoff = time.time() - retention_days * 86400
        self._db.execute("DELETE FROM escalations WHERE ts < ?", (cutoff,))
        self._db.execute("DELETE FROM audits WHERE ts < ?", (cutoff,))
        removed = self._db.execute("DELETE FROM requests WHERE ts < ?", (cutoff,)).rowcount
        self._db.execute(
            "DELETE FROM ship_seq WHERE request_id NOT IN (SELECT request_id FROM requests)"
        )
        return int(removed)

    def rows(self, since: float | None = None) -> Iterator[LedgerRow]:
        query = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE ts >= ? ORDER BY ts"
        for record in self._db.execute(query, (since or 0.0,)):
            yield _row(record)

    def summary(self, by: GroupBy, since: float | None = None) -> list[SummaryRow]:
        key = {
            "app": "COALESCE(app, '-')",
            "tier": "tier_path",
            "model": "model",
            "day": "date(ts, 'unixepoch')",
            "box": "'this box'",
        }[by]
        query = f"SELECT {key}, {SUMMARY_COLUMNS} FROM requests WHERE ts >= ? GROUP BY 1 ORDER BY 1"
        return [summary_row(r) for r in self._db.execute(query, (since or 0.0,))]

    def export(self, fmt: Literal["csv", "json"], since: float | None = None) -> str:
        rows = [row.model_dump(mode="json") for row in self.rows(since)]
        if fmt == "json":
            return json.dumps(rows, indent=2)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "usage_by_tier": json.dumps(row["usage_by_tier"])})
        return buffer.getvalue()
