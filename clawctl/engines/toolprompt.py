"""Chat turns and tools as a model's chat template wants them, for any engine.

A template that renders tools itself (Qwen2.5's does: a `# Tools` system section, calls as
`<tool_call>` JSON, results as `<tool_response>` user turns) gets them as the OpenAI-shaped
dicts HF templates expect, with call arguments decoded to objects (the template re-encodes them
with `tojson`). A template without tool support gets the same conventions spelled out in plain
turns (`hermes_turns`): the Hermes-style prompt Qwen2.5 and NousResearch's Hermes models were
trained on, so every model writes calls in the one syntax `serving/toolcalls.py` parses.
"""

from __future__ import annotations

import json
from typing import Any

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ChatTurn, ToolSpec

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    f"arguments within {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n' + TOOL_CALL_CLOSE
)


def dumps(value: object) -> str:
    """JSON as HF's chat templating writes it (`tojson`): key order kept, non-ASCII as is."""
    return json.dumps(value, ensure_ascii=False)


def template_knows_tools(template: str) -> bool:
    return "tools" in template and "tool_call" in template


def tool_dicts(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": json.loads(tool.parameters),
            },
        }
        for tool in tools
    ]


def template_turns(turns: tuple[ChatTurn, ...]) -> list[dict[str, Any]]:
    """The turns as OpenAI-shaped dicts for a template that renders tools. `developer` is the
    newer name of `system`, which is what templates know."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {
            "role": "system" if turn.role == "developer" else turn.role,
            "content": turn.content,
        }
        if turn.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments(call.arguments)},
                }
                for call in turn.tool_calls
            ]
        if turn.tool_call_id is not None:
            message["tool_call_id"] = turn.tool_call_id
        if turn.name is not None:
            message["name"] = turn.name
        messages.append(message)
    return messages


def hermes_turns(turns: tuple[ChatTurn, ...], tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """Plain `{role, content}` turns carrying tools, calls and results as text, for templates
    that know nothing of tools."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        role = "system" if turn.role == "developer" else turn.role
        content = turn.content
        if turn.tool_calls:
            calls = "\n".join(
                f"{TOOL_CALL_OPEN}\n"
                + dumps({"name": call.name, "arguments": _arguments(call.arguments)})
                + f"\n{TOOL_CALL_CLOSE}"
                for call in turn.tool_calls
            )
            content = f"{content}\n{calls}" if content else calls
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        messages.append({"role": role, "content": content})
    if tools:
        section = (
            TOOLS_HEADER
            + "".join("\n" + dumps(tool["function"]) for tool in tool_dicts(tools))
            + TOOLS_FOOTER
        )
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{section}"}
        else:
            messages.insert(0, {"role": "system", "content": section})
    return messages


def _arguments(text: str) -> object:
    try:
        return json.loads(text or "{}")
    except ValueError:  # validated at the API; a raw string is what the model wrote
        return text
