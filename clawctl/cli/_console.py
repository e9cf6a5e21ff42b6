"""Where the CLI writes: data to stdout, messages and progress to stderr, `--json` as one document.

Every command renders through these helpers so output looks the same everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from pydantic import BaseModel
    from rich.progress import TaskID
    from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    if isinstance(value, dict):
        data: Any = value
    elif isinstance(value, Sequence):
        data = [item.model_dump(mode="json") for item in value]
    else:
        data = value.model_dump(mode="json")
    print(json.dumps(data, indent=2))


def table(*columns: str) -> Table:
    from rich.table import Table

    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column)
    return grid


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


class RichProgress:
    """A `ProgressSink` drawing a bar on stderr (silent when stderr is not a terminal): bytes
    with speed for transfers, or `done/total` for steps (examples, epochs)."""

    def __init__(self, steps: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        amount = (MofNCompleteColumn(),) if steps else (DownloadColumn(), TransferSpeedColumn())
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            *amount,
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def start(self, description: str, total: int | None) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, status="")

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def status(self, text: str) -> None:
        """How the phase is going (a training run's loss and speed), after its description."""
        if self._task is not None:
            self._progress.update(self._task, status=text)

    def message(self, text: str, level: str = "info") -> None:
        """A line from the daemon's operation (warnings in yellow), printed above the bar."""
        prefix = "[yellow]warning:[/yellow] " if level == "warning" else ""
        self._progress.console.print(f"{prefix}{text}", markup=True, highlight=False)
