"""GBNF grammars for tool calls and response_format: hostile schemas are cleaned into grammars
llama.cpp really compiles (checked with the real SmolLM2 vocabulary), and constrained generation
with the real model yields JSON and calls that parse."""

from __future__ import annotations

import copy
import ctypes
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_grammar import LlamaGrammar

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolSpec
from clawctl.engines.grammar import (
    ANY_TYPES,
    REPEAT_CAP,
    GrammarError,
    clean_schema,
    integer_range,
    json_grammar,
    prefix_rules,
    schema_rules,
    tool_call_grammar,
)
from clawctl.errors import BadInput

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "n": {"type": "integer"}},
    "required": ["city", "n"],
}
WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        }
    ),
)
LEFT_RECURSIVE = {  # a def that starts with itself: llama.cpp refuses it, cleaned or not
    "type": "object",
    "properties": {"x": {"$ref": "#/$defs/A"}},
    "required": ["x"],
    "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "string"}]}},
}
NODE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$ref": "#/$defs/Node",
    "$defs": {
        "string": {"type": "integer"},  # a def named like a converter primitive
        "Node": {
            "type": "object",
            "properties": {
                "v": {"$ref": "#/$defs/string"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 4},
            },
            "required": ["v"],
        },
    },
}
HOSTILE: dict[str, object] = {
    "unanchored pattern": {"type": "string", "pattern": "[a-z]+"},
    "anchored pattern with escapes": {
        "type": "string",
        "pattern": r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$",
    },
    "pattern with non-capturing group and dot": {"type": "string", "pattern": r"^(?:ab|c).*?$"},
    "pattern with huge repetition": {"type": "string", "pattern": "^[a-z]{1,100000}$"},
    "pattern with lookahead": {"type": "string", "pattern": "^(?=a)abc$"},
    "huge maxLength": {"type": "string", "maxLength": 65536},
    "huge minLength": {"type": "string", "minLength": 100000},
    "fractional bounds": {"type": "string", "minLength": 2.5, "maxLength": "9"},
    "patternProperties": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    "huge maxItems": {"type": "array", "maxItems": 100000, "items": {"type": "string"}},
    "empty items": {"type": "array", "items": {}},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"const": 1}]},
    "ref and defs": NODE,
    "definitions ref": {
        "definitions": {"Unit": {"enum": ["c", "f"]}},
        "type": "object",
        "properties": {"unit": {"$ref": "#/definitions/Unit"}},
    },
    "ref to a property": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"$ref": "#/properties/a"}},
    },
    "dangling and remote refs": {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/nope"}, "b": {"$ref": "https://x.test/s.json"}},
    },
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    "oneOf with siblings": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "number"}},
        "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "boolean"}}},
        ]
    },
    "enum": {"enum": ["red", 'quo"te', "back\\slash", "new\nline", 3, None, {"k": [1]}]},
    "const": {"const": {"nested": ["x", 1.5, True]}},
    "nested objects": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {"b": {"type": "object", "properties": {"c": {"type": "boolean"}}}},
                "required": ["b"],
            },
            "": {"type": "string"},  # an empty property name
            "root": {"type": "integer"},
            "space": {"type": "string", "minLength": 1},
        },
    },
    "type list with constraints": {"type": ["string", "null"], "maxLength": 3},
    "nullable": {"type": "integer", "nullable": True},
    "annotations only": {
        "title": "T",
        "description": "d",
        "examples": [1],
        "default": 2,
        "deprecated": True,
    },
    "unknown keywords and type": {
        "type": "frobnicate",
        "if": {},
        "then": {},
        "not": {},
        "dependentRequired": {},
    },
    "format the converter lacks": {"type": "string", "format": "email"},
    "format it knows": {"type": "string", "format": "date-time"},
    "true": True,
    "false": False,
    "empty": {},
    "not a schema": [1, 2],
    "garbage type": {"type": 5},
    "deep nesting": json.loads('{"type":"array","items":' * 200 + "{}" + "}" * 200),
}


@pytest.fixture(scope="module")
def vocab(smollm2_gguf: Path) -> Iterator[Any]:
    llama = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=256, verbose=False, vocab_only=True)
    yield llama._model.vocab
    llama.close()


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> Iterator[llama_cpp.Llama]:
    llama = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=512, n_threads=1, verbose=False)
    yield llama
    llama.close()


def compiles(vocab: Any, gbnf: str, trigger: str | None = None) -> bool:
    """Whether llama.cpp builds a grammar sampler (NULL when it cannot parse the grammar)."""
    if trigger is None:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    else:
        patterns = (ctypes.c_char_p * 1)(trigger.encode())
        tokens = (llama_cpp.llama_token * 1)()
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            vocab, gbnf.encode(), b"root", patterns, 1, tokens, 0
        )
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


class Sampler:
    """A grammar sampler fed text (whose tokens the grammar must accept: accepting a rejected
    token aborts the process) and asked which next tokens it allows."""

    def __init__(self, llama: llama_cpp.Llama, gbnf: str, trigger: str | None = None) -> None:
        self.llama = llama
        vocab = llama._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if trigger is None:
            self.ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        else:
            patterns = (ctypes.c_char_p * 1)(trigger.encode())
            self.ptr = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, gbnf.encode(), b"root", patterns, 1, (llama_cpp.llama_token * 1)(), 0
            )
        assert self.ptr

    def feed(self, text: str) -> None:
        for token in self.llama.tokenize(text.encode(), add_bos=False, special=True):
            assert self.allows_token(token), text
            llama_cpp.llama_sampler_accept(self.ptr, token)

    def allows_token(self, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        array = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(array))
        return bool(data[0].logit > float("-inf"))

    def allows(self, text: str) -> bool:
        tokens = self.llama.tokenize(text.encode(), add_bos=False, special=True)
        assert len(tokens) == 1, (text, tokens)
        return self.allows_token(tokens[0])

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.ptr)


# --- cleaning --------------------------------------------------------------------------------


def test_clean_schema_never_mutates_or_shares_its_input() -> None:
    for schema in HOSTILE.values():
        before = copy.deepcopy(schema)
        cleaned = clean_schema(schema)
        assert schema == before
        json.dumps(cleaned)  # plain JSON
        cleaned["type"] = "mutated"
        cleaned.pop("$defs", None)
        assert schema == before
    enum_schema = {"enum": [{"k": [1]}]}
    enum_out = clean_schema(enum_schema)["enum"]
    assert isinstance(enum_out, list)
    enum_out[0]["k"].append(2)
    assert enum_schema == {"enum": [{"k": [1]}]}


def test_clean_schema_drops_what_a_grammar_cannot_afford_or_express() -> None:
    any_value = {"type": list(ANY_TYPES)}
    assert clean_schema({"type": "string", "maxLength": 65536}) == {"type": "string"}
    assert clean_schema({"type": "string", "minLength": 3, "maxLength": REPEAT_CAP}) == {
        "type": "string",
        "minLength": 3,
        "maxLength": REPEAT_CAP,
    }
    assert clean_schema({"type": "string", "minLength": REPEAT_CAP + 1}) == {"type": "string"}
    assert clean_schema({"type": "array", "maxItems": 100000, "items": {"type": "string"}}) == {
        "type": "array",
        "items": {"type": "string"},
    }
    assert clean_schema({"type": "string", "pattern": "[a-z]+"}) == {"type": "string"}
    assert clean_schema({"type": "string", "format": "email"}) == {"type": "string"}
    assert clean_schema({"type": 5}) == any_value
    assert clean_schema(True) == any_value
    assert clean_schema({}) == any_value
    assert clean_schema("nonsense") == any_value
    assert clean_schema(HOSTILE["annotations only"]) == any_value
    assert clean_schema({"minLength": 2}) == {"type": "string", "minLength": 2}
    assert clean_schema({"type": "integer", "nullable": True}) == {"type": ["integer", "null"]}
    assert clean_schema(HOSTILE["patternProperties"]) == {
        "type": "object",
        "additionalProperties": {"type": "string"},
    }
    assert clean_schema({"type": "array", "items": False}) == {
        "type": "array",
        "items": any_value,
        "maxItems": 0,
    }


def test_clean_schema_rewrites_patterns_into_json_safe_gbnf_friendly_ones() -> None:
    def pattern(p: str) -> object:
        return clean_schema({"type": "string", "pattern": p}).get("pattern")

    assert pattern(r"^\d{3}-\d{4}$") == "^[0-9]{3}-[0-9]{4}$"
    assert pattern(r"^(?:a|b)+?\.x$") == r"^(a|b)+[\x2E]x$"
    assert pattern(r"^[^,]*$") == r"^[^\x00-\x1F\x22\x2C\x5C\x7F]*$"  # no raw " or \ or controls
    assert pattern(r'^[a"\\]$') == "^[a]$"
    assert pattern("^a{2,9999}$") == "^a{2,}$"
    unusable_patterns = (
        "abc",
        "^abc",
        r"^a\b$",
        "^(?=a)a$",
        r'^"$',
        r"^(a)\1$",
        "^a{99999}$",
        "^(*a)$",
    )
    for unusable in unusable_patterns:
        assert pattern(unusable) is None, unusable


def test_clean_schema_resolves_refs_into_its_own_defs_and_distributes_siblings() -> None:
    cleaned = clean_schema(NODE)
    assert cleaned["$ref"] == "#/$defs/Node"
    defs = cleaned["$defs"]
    assert isinstance(defs, dict)
    assert defs["string"] == {"type": "integer"}
    assert defs["Node"]["properties"]["kids"]["items"] == {"$ref": "#/$defs/Node"}
    one_of: Any = clean_schema(HOSTILE["oneOf with siblings"])
    assert [alt["required"] for alt in one_of["anyOf"]] == [["a"], ["b"]]
    assert clean_schema(HOSTILE["allOf"]) == {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}},
        "required": ["a"],
    }


# --- compiling in llama.cpp -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_schemas_compile_in_llama_cpp(vocab: Any, name: str) -> None:
    grammar = json_grammar(HOSTILE[name])
    assert grammar.trigger is None
    assert compiles(vocab, grammar.gbnf), grammar.gbnf[:2000]


def test_repeat_cap_is_within_what_llama_cpp_accepts(vocab: Any) -> None:
    tightest = {"type": "array", "maxItems": REPEAT_CAP, "minItems": 1}
    tightest["items"] = {"type": "string", "maxLength": REPEAT_CAP, "minLength": REPEAT_CAP}
    assert compiles(vocab, schema_rules(tightest))
    assert compiles(vocab, schema_rules({"type": "string", "pattern": f"^(ab){{0,{REPEAT_CAP}}}$"}))


def test_json_object_mode_and_any_object_grammar_compile(vocab: Any) -> None:
    grammar = json_grammar(None)
    assert grammar.trigger is None
    assert compiles(vocab, grammar.gbnf)


def test_a_schema_no_grammar_can_express_is_a_grammar_error() -> None:
    with pytest.raises(GrammarError) as caught:
        schema_rules(LEFT_RECURSIVE)
    assert isinstance(caught.value, BadInput)  # response_format: HTTP 400
    with pytest.raises(GrammarError):
        json_grammar(LEFT_RECURSIVE)


@pytest.mark.parametrize(("parallel", "lazy"), [(False, False), (True, False), (True, True)])
def test_tool_call_grammar_compiles_eager_and_lazy(vocab: Any, parallel: bool, lazy: bool) -> None:
    tools = [
        WEATHER,
        *(
            ToolSpec(f"t{i}", "", json.dumps(s))
            for i, s in enumerate(HOSTILE.values())
            if isinstance(s, dict) and s.get("type") == "object"
        ),
    ]
    grammar, warnings = tool_call_grammar(tools, parallel=parallel, lazy=lazy)
    assert warnings == []
    assert compiles(vocab, grammar.gbnf, grammar.trigger), grammar.gbnf[:2000]
    if lazy:
        assert grammar.trigger is not None
        match = re.fullmatch(grammar.trigger, f"Let me look.\n{TOOL_CALL_OPEN}\n{{")
        assert match is not None
        assert match.start(1) == len("Let me look.\n")
        assert re.fullmatch(grammar.trigger, "no call here") is None
    else:
        assert grammar.trigger is None


def test_uncompilable_tool_schemas_warn_and_fall_back_to_any_object(vocab: Any) -> None:
    tools = [
        WEATHER,
        ToolSpec("recursive", "", json.dumps(LEFT_RECURSIVE)),
        ToolSpec("not_json", "", "{nope"),
        ToolSpec("garbage", "", json.dumps({"type": 5})),
        ToolSpec("a_string", "", json.dumps({"type": "string"})),
        ToolSpec("no_args", "", "{}"),
    ]
    grammar, warnings = tool_call_grammar(tools, parallel=False, lazy=False)
    assert len(warnings) == 4
    for warned, line in zip(
        ("recursive", "not_json", "garbage", "a_string"), warnings, strict=True
    ):
        assert line.startswith(f"tool {warned!r}: ")
        assert line.endswith("any JSON object")
    assert compiles(vocab, grammar.gbnf)


def test_tool_names_are_escaped_and_only_restricts_to_one_tool(vocab: Any) -> None:
    tools = [WEATHER, ToolSpec("get-weather_2", "", WEATHER.parameters)]
    grammar, _ = tool_call_grammar(tools, parallel=False, lazy=False, only="get-weather_2")
    assert '"\\"get-weather_2\\", \\"arguments\\": "' in grammar.gbnf
    assert "get_weather" not in grammar.gbnf
    assert compiles(vocab, grammar.gbnf)
    with pytest.raises(BadInput):
        tool_call_grammar(tools, parallel=False, lazy=False, only="missing")
    with pytest.raises(BadInput):
        tool_call_grammar([], parallel=False, lazy=False)


def test_each_schema_keeps_its_own_rules_when_embedded() -> None:
    a = {
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/D"}},
        "$defs": {"D": {"type": "integer"}},
    }
    b = {
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/D"}},
        "$defs": {"D": {"type": "boolean"}},
    }
    grammar, _ = tool_call_grammar(
        [ToolSpec("a", "", json.dumps(a)), ToolSpec("b", "", json.dumps(b))],
        parallel=False,
        lazy=False,
    )
    defined = re.findall(r"(?m)^([A-Za-z0-9-]+) ::=", grammar.gbnf)
    assert len(defined) == len(set(defined))
    assert {"a0-root", "a1-root", "a0-integer", "a1-boolean"} <= set(defined)
    assert prefix_rules('r ::= "r" [r] x{1,2} # r\n', "p-") == 'p-r ::= "r" [r] p-x{1,2} \n'


# --- what the grammars allow ------------------------------------------------------------------


def test_strings_never_admit_raw_control_characters_or_unescaped_quotes(
    model: llama_cpp.Llama,
) -> None:
    for schema in ({"type": "string"}, {"type": "string", "pattern": "^.*$"}):
        sampler = Sampler(model, schema_rules(schema))
        try:
            sampler.feed('"abc')
            assert sampler.allows("d")
            assert not sampler.allows("\n")
            assert sampler.allows('"')  # the closing quote
            sampler.feed('"')
            assert not sampler.allows('"')
        finally:
            sampler.close()


def test_lazy_grammar_is_free_until_the_open_tag(model: llama_cpp.Llama) -> None:
    grammar, _ = tool_call_grammar([WEATHER], parallel=False, lazy=True)
    sampler = Sampler(model, grammar.gbnf, grammar.trigger)
    try:
        sampler.feed("Sure, let me check")
        assert sampler.allows("hello")
        sampler.feed(f"\n{TOOL_CALL_OPEN}")
        assert not sampler.allows("hello")
        assert sampler.allows("\n")
    finally:
        sampler.close()


def test_generation_with_a_response_schema_is_valid_json(model: llama_cpp.Llama) -> None:
    grammar = json_grammar(CITY)
    out = model.create_completion(
        "The largest city in France and its population in millions, as JSON:\n",
        max_tokens=60,
        temperature=0,
        grammar=LlamaGrammar.from_string(grammar.gbnf, verbose=False),
    )
    choice = out["choices"][0]  # type: ignore[index]
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(choice["text"])
    assert isinstance(value["city"], str)
    assert len(value["city"]) <= 20
    assert isinstance(value["n"], int)
    assert set(value) == {"city", "n"}


def test_generation_with_a_required_tool_call_parses(model: llama_cpp.Llama) -> None:
    grammar, warnings = tool_call_grammar([WEATHER], parallel=False, lazy=False)
    assert warnings == []
    out = model.create_completion(
        "User: What is the weather like in Paris?\nAssistant: ",
        max_tokens=60,
        temperature=0,
        grammar=LlamaGrammar.from_string(grammar.gbnf, verbose=False),
    )
    choice = out["choices"][0]  # type: ignore[index]
    text = choice["text"]
    assert choice["finish_reason"] == "stop", choice
    assert text.startswith(TOOL_CALL_OPEN + "\n")
    assert text.endswith("\n" + TOOL_CALL_CLOSE)
    body = json.loads(text[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
    assert body["name"] == "get_weather"
    assert isinstance(body["arguments"], dict)
    assert isinstance(body["arguments"]["city"], str)


def test_a_pattern_llama_cpp_refuses_is_dropped_not_the_schema(vocab: Any) -> None:
    # The converter takes it, llama.cpp calls `(a|)*` left-recursive: only the pattern goes.
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^(a|)*$"},
            "pattern": {"type": "string", "pattern": "^[0-9]+$"},  # a property named "pattern"
        },
        "required": ["code", "pattern"],
    }
    gbnf = schema_rules(schema)
    assert compiles(vocab, gbnf)
    assert '"\\"pattern\\""' in gbnf
    assert schema_rules({"type": "string", "pattern": "^(a|)*$"}) == schema_rules(
        {"type": "string"}
    )


def test_lazy_grammar_constrains_a_bare_call_from_its_brace(model: llama_cpp.Llama) -> None:
    """Small models under `auto` write a call as a bare (often fenced) object; the lazy grammar
    engages at its `{"name"` and holds the name to an offered tool and the arguments to it."""
    grammar, _ = tool_call_grammar([WEATHER], parallel=False, lazy=True)
    sampler = Sampler(model, grammar.gbnf, grammar.trigger)
    try:
        sampler.feed('```json\n{\n  "name"')
        assert not sampler.allows("hello")  # constrained from here on
        sampler.feed(': "get_weather",\n  "arguments": {"city": "Paris"}\n}')
        sampler.feed("\n```")
    finally:
        sampler.close()
    prose, _ = tool_call_grammar([WEATHER], parallel=False, lazy=True)
    free = Sampler(model, prose.gbnf, prose.trigger)
    try:
        free.feed('The JSON you asked for: {"name"')  # not the answer's start: not a call
        assert free.allows("hello")
    finally:
        free.close()


def test_sampling_first_then_masking_gives_the_masked_chains_text(model: llama_cpp.Llama) -> None:
    """`CandidateSampler` checks the chain's pick against the grammar and masks the vocabulary
    only on a rejection; greedy, that yields exactly what a chain with the grammar in it (the
    vocabulary masked every step) yields; a model that follows the format (shown one call here)
    is masked on few steps."""
    from clawctl.engines.llama.constrained import CandidateSampler

    grammar, _ = tool_call_grammar([WEATHER], parallel=False, lazy=False)
    shown = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    few_shot = f"User: Weather in Rome?\nAssistant: {shown}\nUser: And in Paris?\nAssistant: "
    vocab = model._model.vocab
    candidates = CandidateSampler(model.n_vocab())

    def generate(masked_first: bool) -> str:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        constraint = llama_cpp.llama_sampler_init_grammar(vocab, grammar.gbnf.encode(), b"root")
        if masked_first:  # the chain owns (and frees) the grammar sampler
            llama_cpp.llama_sampler_chain_add(chain, constraint)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        out: list[int] = []
        try:
            model.reset()
            model.eval(model.tokenize(few_shot.encode()))
            for _ in range(60):
                pointer = llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1)
                logits = np.ctypeslib.as_array(pointer, shape=(model.n_vocab(),))
                if masked_first:
                    token = candidates._apply(chain, None, logits)
                    llama_cpp.llama_sampler_accept(chain, token)
                else:
                    token = candidates.sample(chain, constraint, logits)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                out.append(token)
                model.eval([token])
        finally:
            llama_cpp.llama_sampler_free(chain)
            if not masked_first:
                llama_cpp.llama_sampler_free(constraint)
        return model.detokenize(out).decode()

    reference = generate(masked_first=True)
    assert reference.startswith(TOOL_CALL_OPEN)
    assert reference.endswith(TOOL_CALL_CLOSE)
    candidates.masked = 0
    assert generate(masked_first=False) == reference
    steps = len(model.tokenize(reference.encode(), add_bos=False))
    assert 1 <= candidates.masked < steps // 2


def _range_regex(gbnf: str) -> re.Pattern[str]:
    """The integer-range expression as a Python regex (it uses only literals, classes,
    groups, alternation and counted repetition, which read the same in both)."""
    return re.compile(re.sub(r'"(\d)"', r"\1", gbnf).replace(" ", ""))


@pytest.mark.parametrize(
    ("low", "high"), [(0, None), (1, None), (9, None), (120, None), (0, 10), (7, 123), (15, 15)]
)
def test_integer_range_admits_exactly_the_bounded_integers(low: int, high: int | None) -> None:
    pattern = _range_regex(integer_range(low, high))
    for n in range(2100):
        admitted = low <= n and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) == admitted, n
    assert not pattern.fullmatch("01")  # no leading zeros
    assert not pattern.fullmatch("-1")


def test_integer_bounds_reach_the_grammar(model: llama_cpp.Llama) -> None:
    """OpenClaw's `read` tool: `offset` is an integer >= 1 (Qwen wrote 0 unconstrained)."""
    schema = {
        "type": "object",
        "properties": {"offset": {"type": "integer", "minimum": 1}},
        "required": ["offset"],
    }
    grammar = json_grammar(schema)
    sampler = Sampler(model, grammar.gbnf)
    try:
        sampler.feed('{"offset": ')
        assert not sampler.allows("0")
        assert not sampler.allows("-")
        assert sampler.allows("1")
    finally:
        sampler.close()
