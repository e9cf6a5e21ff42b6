"""A process that was forked without exec stops at once instead of running clawctl again.

Found in the field: one `clawctl models pull` as a chain of 617 nested processes, each a fork of
the one before with the same command line. clawctl itself never forks without exec: it starts
children with `subprocess`/`asyncio` (fork+exec inside C, where Python's at-fork hooks do not run)
and runs build tools as `python -m clawctl.build` children. A library calling `os.fork()` (or
`multiprocessing` with the fork start method) inside the CLI or the daemon would copy a process
full of threads (llama.cpp's OpenMP pool, the event loop, Rich's refresh thread) and let the copy
return into clawctl's own code, which is how a chain can grow. The CLI and clawd therefore refuse
such copies outright; build subprocesses (where torch may use worker processes legitimately)
allow a bounded depth, so a runaway chain ends after a few generations.
"""

from __future__ import annotations

import os

_depth = 0  # forks without exec between this process and the one that installed the guard


def install(program: str, max_depth: int = 0) -> None:
    """Make every fork (without exec) of this process deeper than `max_depth` exit with 70."""

    def after_in_child() -> None:
        global _depth
        _depth += 1
        if _depth > max_depth:
            note = f"{program}: a forked copy of this process was stopped (fork without exec)\n"
            os.write(2, note.encode())
            os._exit(70)

    os.register_at_fork(after_in_child=after_in_child)
