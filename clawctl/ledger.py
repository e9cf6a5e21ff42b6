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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from clawctl.schemas.ledger import GroupBy, SummaryRow


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


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("m001_requests", _create_requests),
    ("m002_escalations", _create_escalations),
    ("m003_answer_cache", _add_cache_columns),
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


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        migrate(self._db)

    def close(self) -> None:
        self._db.close()

    def record(self, row: LedgerRow) -> None:
        values = row.model_dump()
        values["usage_by_tier"] = json.dumps(values["usage_by_tier"])
        placeholders = ", ".join("?" for _ in COLUMNS)
        self._db.execute(
            f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({placeholders})",
            [values[c] for c in COLUMNS],
        )

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
        return self._db.execute("DELETE FROM requests WHERE ts < ?", (cutoff,)).rowcount

    def rows(self, since: float | None = None) -> Iterator[LedgerRow]:
        query = f"SELECT {', '.join(COLUMNS)} FROM requests WHERE ts >= ? ORDER BY ts"
        for record in self._db.execute(query, (since or 0.0,)):
            values = dict(zip(COLUMNS, record, strict=True))
            values["usage_by_tier"] = json.loads(values["usage_by_tier"])
            yield LedgerRow.model_validate(values)

    def summary(self, by: GroupBy, since: float | None = None) -> list[SummaryRow]:
        key = {
            "app": "COALESCE(app, '-')",
            "tier": "tier_path",
            "model": "model",
            "day": "date(ts, 'unixepoch')",
        }[by]
        query = f"""SELECT {key}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
                    SUM(prefill_tokens_saved), SUM(remote_cost), SUM(all_remote_cost),
                    COUNT(cached), SUM(tokens_saved), SUM(cost_saved)
                    FROM requests WHERE ts >= ? GROUP BY 1 ORDER BY 1"""
        return [
            SummaryRow(
                key=str(r[0]),
                requests=r[1],
                prompt_tokens=r[2],
                completion_tokens=r[3],
                prefill_tokens_saved=r[4],
                remote_cost=r[5],
                all_remote_cost=r[6],
                cached=r[7],
                tokens_saved=r[8],
                cost_saved=r[9],
            )
            for r in self._db.execute(query, (since or 0.0,))
        ]

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
