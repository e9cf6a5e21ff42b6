"""`clawctl chat`: talk to a model through the daemon, streaming the reply."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import err, out
from clawctl.cli._options import JsonOption, ModelOption


def register(app: typer.Typer) -> None:
    @app.command()
    def chat(
        message: Annotated[
            str | None, typer.Argument(help="Message; interactive if omitted.")
        ] = None,
        model: ModelOption = None,
        system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
        max_tokens: Annotated[int | None, typer.Option(min=1, help="Reply length limit.")] = None,
        temperature: Annotated[float | None, typer.Option(min=0, max=2)] = None,
        json_: JsonOption = False,
    ) -> None:
        """Chat with a model through clawd (streams the reply).

        Example: clawctl chat "Name three edge devices" --model smollm2-135m
        """
        from clawctl.client import StreamEnd

        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        interactive = message is None
        with daemon_client() as client:
            client.health()  # fail fast with exit code 3 if the daemon is down
            while True:
                if interactive:
                    try:
                        message = input(">>> ") if sys.stdin.isatty() else sys.stdin.readline()
                    except EOFError:
                        break
                    if not message or message.strip() in ("/bye", "/exit"):
                        break
                history.append({"role": "user", "content": str(message).strip()})
                reply: list[str] = []
                end: StreamEnd | None = None
                for item in client.chat_stream(
                    history, model=model, max_tokens=max_tokens, temperature=temperature
                ):
                    if isinstance(item, StreamEnd):
                        end = item
                    else:
                        reply.append(item)
                        if not json_:
                            out.print(item, end="", markup=False)
                history.append({"role": "assistant", "content": "".join(reply)})
                if json_:
                    print(
                        json.dumps(
                            {
                                "content": "".join(reply),
                                "finish_reason": end.finish_reason if end else None,
                                "usage": end.usage.model_dump() if end and end.usage else None,
                                "claw": end.claw.model_dump() if end and end.claw else None,
                            },
                            indent=2,
                        )
                    )
                else:
                    out.print()
                    if end and end.claw and err.is_terminal:
                        t = end.claw.timings
                        err.print(
                            f"[dim]{end.claw.model} · {t.decode_tokens_per_s or 0:.1f} tok/s "
                            f"· {t.total_ms:.0f} ms[/dim]"
                        )
                if not interactive:
                    break
