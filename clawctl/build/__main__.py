"""`python -m clawctl.build OP ARGS_JSON`: one build operation, reporting NDJSON on stdout.

Started by clawd (serving/build_runner.py) with the daemon's environment, so it reads and
writes the daemon's stores. Exit code 0 after a `result` line, 1 after an `error` line.
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from clawctl.build.jobstream import LineProgress, LineWriter
from clawctl.errors import ClawError


def main(argv: list[str]) -> int:
    from clawctl.build import adapter_ops, distill_ops, model_ops  # noqa: F401  (register their operations)
    from clawctl.build.ops import OPS

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    writer = LineWriter()
    if len(argv) != 2 or argv[0] not in OPS:
        writer.error(
            f"usage: python -m clawctl.build {{{','.join(sorted(OPS))}}} ARGS_JSON",
            "invalid_request",
            400,
        )
        return 2
    build_op = OPS[argv[0]]
    try:
        request = build_op.request.model_validate_json(argv[1])
    except ValidationError as exc:
        writer.error(
            f"bad arguments for {argv[0]}: {exc.errors()[0]['msg']}", "invalid_request", 400
        )
        return 2
    progress = LineProgress(writer)
    try:
        result = build_op.run(request, progress, writer)
    except ClawError as exc:
        progress.flush()
        writer.error(exc.message, exc.code, exc.http_status)
        return 1
    progress.flush()
    writer.result(result)
    return 0


if __name__ == "__main__":
    from clawctl import forkguard

    forkguard.install("clawctl.build", max_depth=2)
    raise SystemExit(main(sys.argv[1:]))
