"""Runs build tools (pull, quantize, convert, adapter installs…) for the daemon in subprocesses.

Why subprocesses: the tools are heavy (llama.cpp's quantizer, onnxruntime's, torch for
conversion) and CPU-bound for minutes; in clawd's process they would hold memory, the GIL and
llama.cpp's OpenMP threads next to the models it serves. A child started with `exec` (never a
bare fork of the daemon: a forked copy of a threaded process can deadlock or re-run its caller)
runs `python -m clawctl.build OP` with the daemon's own environment, so it writes the daemon's
stores as the daemon's user, niced, and reports `JobLine`s on stdout that the admin routes relay
to the client as NDJSON. A client that goes away stops the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from clawctl.config import environment
from clawctl.schemas.jobs import JOB_LINE, ErrorLine, JobLine, MessageLine

log = logging.getLogger("clawd.build")
NICENESS = 10


async def run_build(op: str, args: dict[str, Any]) -> AsyncIterator[JobLine]:
    """Start `python -m clawctl.build OP ARGS_JSON` and yield its lines; the last line is always a
    `result` or an `error`."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clawctl.build",
        op,
        json.dumps(args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(environment()),
        limit=1 << 20,
    )
    with contextlib.suppress(OSError):  # lower the child's priority, never the daemon's
        os.setpriority(os.PRIO_PROCESS, child.pid, NICENESS)
    assert child.stdout is not None
    assert child.stderr is not None
    ended = False
    try:
        async for raw in child.stdout:
            try:
                line = JOB_LINE.validate_json(raw)
            except ValidationError:
                line = MessageLine(text=raw.decode(errors="replace").rstrip())
            ended = ended or line.type in ("result", "error")
            yield line
        stderr = (await child.stderr.read()).decode(errors="replace").strip()
        code = await child.wait()
        if not ended:
            log.error("build %s exited %s without a result: %s", op, code, stderr[-2000:])
            last = stderr.splitlines()[-1] if stderr else f"exit code {code}"
            yield ErrorLine(message=f"{op} failed: {last}", code="build_failed", status=500)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
