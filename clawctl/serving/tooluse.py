"""What a request's tools and response format mean for one generation: the tools its prompt
offers, the grammar that constrains decoding, and whether calls are parsed from the output.

Shared by every API face (OpenAI's `tools`/`tool_choice`/`response_format`, Ollama's
`tools`/`format`), so tools and structured output behave the same whatever the client speaks.
Grammars come from `engines/grammar.py`: a tool whose schema cannot become a grammar is decoded
with "any JSON object" arguments and logged, never refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clawctl.engines.base import Grammar, ToolSpec
from clawctl.engines.grammar import json_grammar, tool_call_grammar

log = logging.getLogger("clawd.requests")


@dataclass(frozen=True)
class ToolUse:
    tools: tuple[ToolSpec, ...]  # offered in the prompt
    grammar: Grammar | None
    names: frozenset[str]  # calls to these are parsed out of the text
    # What the request asked, kept so a remote tier is asked the same (it applies its own
    # constraints): `choice` as given ("auto", "required", a tool's name; None: unset).
    choice: str | None = None
    parallel: bool = True
    json_output: bool = False
    response_schema: str | None = None  # JSON text of the json_schema asked for

    @property
    def parses_calls(self) -> bool:
        return bool(self.names)


NO_TOOLS = ToolUse((), None, frozenset())


def tool_spec(name: str, description: str, parameters: Mapping[str, object]) -> ToolSpec:
    """A wire tool definition as the engines take it. One serialization for every face, so the
    same tools make the same prompt (and cache key) whichever API they came through."""
    return ToolSpec(name, description, json.dumps(parameters))


def plan_tool_use(
    tools: Sequence[ToolSpec],
    choice: str | None,
    parallel: bool,
    response_schema: object | None = None,
    json_output: bool = False,
) -> ToolUse:
    """`choice`: "auto" (the default when tools are given), "none", "required", or a tool's
    name. `auto` constrains lazily, from the first `<tool_call>` on; `required` and a named tool
    from the first token. Without tools (or with "none"), `json_output` constrains the answer to
    JSON (`response_schema`, or any object)."""
    offered = tuple(tools)
    schema_text = None if response_schema is None else json.dumps(response_schema)
    if offered and choice != "none":
        lazy = choice in (None, "auto")
        only = None if choice in (None, "auto", "required") else choice
        grammar, warnings = tool_call_grammar(offered, parallel=parallel, lazy=lazy, only=only)
        for warning in warnings:
            log.warning("%s", warning)
        names = frozenset(t.name for t in offered if only is None or t.name == only)
        return ToolUse(offered, grammar, names, choice, parallel)
    if json_output:
        grammar = json_grammar(response_schema)
        return ToolUse((), grammar, frozenset(), None, parallel, True, schema_text)
    return NO_TOOLS
