"""The build operations clawd runs in subprocesses, by name: `python -m clawctl.build OP ARGS`.

Each operation takes its typed request (a pydantic model from `clawctl.schemas`, sent as JSON by
the daemon), a progress sink, and a `LineWriter` for messages, and returns its typed result. The
table is the one list of what the daemon may run; `build/__main__.py` dispatches on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from clawctl.build.jobstream import LineProgress, LineWriter


@dataclass(frozen=True)
class BuildOp:
    request: type[BaseModel]
    run: Callable[[Any, LineProgress, LineWriter], BaseModel]


OPS: dict[str, BuildOp] = {}


def op(
    name: str, request: type[BaseModel]
) -> Callable[
    [Callable[[Any, LineProgress, LineWriter], BaseModel]],
    Callable[[Any, LineProgress, LineWriter], BaseModel],
]:
    """Register a build operation under `name`."""

    def register(
        fn: Callable[[Any, LineProgress, LineWriter], BaseModel],
    ) -> Callable[[Any, LineProgress, LineWriter], BaseModel]:
        OPS[name] = BuildOp(request, fn)
        return fn

    return register
