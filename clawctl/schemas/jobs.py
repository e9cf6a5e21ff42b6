"""The lines of a long admin operation's stream (pull, add, quantize, convert, install, import).

clawd answers such requests with NDJSON (`application/x-ndjson`), one `JobLine` per line, as
ollama streams `pull`: progress while it works, then exactly one `result` or `error` line. The
same lines are what a build subprocess (`python -m clawctl.build`) writes on its stdout, so the
daemon relays them without translating, and the client renders them with Rich.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter


class StartLine(BaseModel):
    """A new phase begins (a download, hashing, quantizing); `total` in bytes or steps."""

    type: Literal["start"] = "start"
    description: str
    total: int | None = None


class AdvanceLine(BaseModel):
    type: Literal["advance"] = "advance"
    amount: int


class StatusLine(BaseModel):
    """How the current phase is going, beside its bar (a training run's loss and speed)."""

    type: Literal["status"] = "status"
    text: str


class MessageLine(BaseModel):
    """Something the user should read (a warning, a step's outcome)."""

    type: Literal["message"] = "message"
    text: str
    level: Literal["info", "warning"] = "info"


class ResultLine(BaseModel):
    """The operation's outcome: the typed response of that route, as JSON."""

    type: Literal["result"] = "result"
    result: dict[str, Any]


class ErrorLine(BaseModel):
    """The operation failed: the same fields as the API's error envelope."""

    type: Literal["error"] = "error"
    message: str
    code: str | None = None
    status: int = 500


JobLine = Annotated[
    StartLine | AdvanceLine | StatusLine | MessageLine | ResultLine | ErrorLine,
    Field(discriminator="type"),
]
JOB_LINE: TypeAdapter[JobLine] = TypeAdapter(JobLine)
