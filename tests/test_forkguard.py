"""A fork without exec of clawctl (or clawd) stops at once; fork+exec children are unaffected."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, subprocess, sys
from clawctl import forkguard
forkguard.install("test", max_depth={depth})
ok = subprocess.run([sys.executable, "-c", "print('exec child ran')"],
                    capture_output=True, text=True)
print(ok.stdout.strip())
def chain(level):
    pid = os.fork()
    if pid == 0:
        print("fork child at depth", level, flush=True)
        chain(level + 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("depth", level, "child exit", os.waitstatus_to_exitcode(status), flush=True)
chain(1)
"""


def run(depth: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(depth=depth)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_guard_stops_any_fork_without_exec() -> None:
    done = run(depth=0)
    assert "exec child ran" in done.stdout  # subprocess (fork+exec) still works
    assert "fork child" not in done.stdout
    assert "depth 1 child exit 70" in done.stdout
    assert "fork without exec" in done.stderr


def test_a_build_child_allows_a_bounded_chain() -> None:
    done = run(depth=2)
    assert "fork child at depth 1" in done.stdout
    assert "fork child at depth 2" in done.stdout
    assert "fork child at depth 3" not in done.stdout
    assert "depth 3 child exit 70" in done.stdout
