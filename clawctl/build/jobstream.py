"""How a build subprocess reports: `JobLine`s as NDJSON on stdout (see schemas/jobs.py).

`LineProgress` is a `ProgressSink` for the store and the converters that writes `start`/`advance`
lines, coalescing advances so a multi-GB download writes a few hundred lines, not millions.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from pydantic import BaseModel

from clawctl.schemas.jobs import (
    AdvanceLine,
    ErrorLine,
    MessageLine,
    ResultLine,
    StartLine,
    StatusLine,
)


class LineWriter:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def write(self, line: BaseModel) -> None:
        self.stream.write(line.model_dump_json() + "\n")
        self.stream.flush()

    def message(self, text: str, level: str = "info") -> None:
        self.write(MessageLine(text=text, level="warning" if level == "warning" else "info"))

    def result(self, value: BaseModel) -> None:
        self.write(ResultLine(result=value.model_dump(mode="json")))

    def error(self, message: str, code: str | None, status: int) -> None:
        self.write(ErrorLine(message=message, code=code, status=status))


class LineProgress:
    """A ProgressSink that writes progress lines at most every 0.1 s."""

    def __init__(self, writer: LineWriter, interval: float = 0.1) -> None:
        self.writer = writer
        self.interval = interval
        self._pending = 0
        self._last = 0.0
        self._status: str | None = None

    def start(self, description: str, total: int | None) -> None:
        self.flush()
        self.writer.write(StartLine(description=description, total=total))

    def advance(self, amount: int) -> None:
        self._pending += amount
        now = time.monotonic()
        if now - self._last >= self.interval:
            self.flush()
            self._last = now

    def status(self, text: str) -> None:
        """Shown beside the bar; like advances, written at most every `interval`."""
        self._status = text

    def flush(self) -> None:
        if self._status is not None:
            self.writer.write(StatusLine(text=self._status))
            self._status = None
        if self._pending:
            self.writer.write(AdvanceLine(amount=self._pending))
            self._pending = 0
