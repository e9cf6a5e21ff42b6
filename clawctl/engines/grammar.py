"""GBNF grammars that make llama.cpp emit valid tool calls and valid `response_format` JSON.

Schemas become grammars through llama-cpp-python's port of llama.cpp's JSON-Schema converter
(`llama_cpp.llama_grammar.SchemaConverter`). It has sharp edges, and a client's schema must never
take the daemon down nor fail a request because of them, so this module owns them:

- It asserts on much of real-world JSON Schema (no `type`, unknown types, `{}` items, `$ref` to
  anything but `#/...`, `(?:` in patterns). `clean_schema` rewrites a schema into the subset it
  handles, dropping what only annotates or what a grammar cannot afford; dropping a constraint
  only ever loosens the grammar.
- It spells `maxLength: n` (and maxItems, `{m,n}`) as n nested optionals. llama.cpp's parser
  rejects more than 1000 levels in a rule and overflows its stack (SIGSEGV, the whole daemon) near
  10^4, so bounds above `REPEAT_CAP` are dropped before the converter sees them.
- Its string `char` admits raw control characters, its `.` admits `"`, and its literals leave `\\`
  unescaped, so output it allows would fail `json.loads`; those rules are replaced here.
- Its `$ref` rules are named after the last pointer segment and silently reuse any existing rule
  of that name (a def called `string` becomes the string primitive), so refs are resolved here.
- Patterns it "translates" can still be invalid GBNF (`\\d` is no GBNF escape), so patterns are
  rewritten into a safe subset first and every grammar is parsed by llama.cpp itself (no vocabulary
  needed) before it is returned.

Each schema is converted on its own with root `root`; a bigger grammar embeds it by prefixing
every rule name of it (`a0-root`, `a0-string`, ...), so schemas never share or clash over rules.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Grammar, ToolSpec
from clawctl.errors import BadInput

# Upper repetition bounds (maxLength, maxItems, {m,n}) above this are dropped, lower ones above it
# too. llama.cpp accepts up to 1000 nested levels per rule (measured: 1001 is rejected, ~20000
# crashes the parser); half of that leaves room for min+max combinations, and keeps a grammar for
# 50 such properties near 200 KB / 25 ms to parse. Sampling cost does not depend on it.
REPEAT_CAP = 500
MAX_DEPTH = 32  # schema nesting kept; deeper sub-schemas accept any JSON value
MAX_NODES = 5000  # sub-schemas cleaned per schema; the rest accept any JSON value
MAX_RULES_CHARS = 512 * 1024  # a schema whose grammar is larger than this is refused

# Every JSON value, as a `type` list the converter turns into a union of its primitives
# (it reads a bare `{}` as "any object", not "any value").
ANY_TYPES = ("object", "array", "string", "number", "boolean", "null")
_TYPES = frozenset({*ANY_TYPES, "integer"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{n}" for n in range(1, 6))})
_TYPE_HINTS = (  # which type a schema without `type` means, from its keywords
    ("object", ("properties", "additionalProperties", "patternProperties", "required")),
    ("array", ("items", "prefixItems", "minItems", "maxItems")),
    ("string", ("pattern", "format", "minLength", "maxLength")),
    ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")),
)
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "examples",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)

# JSON-safe replacements for the converter's string rules (no raw control chars, `"` or `\`).
_SAFE_CHAR = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_SAFE_DOT = r'[^"\\\x7F\x00-\x1F]'
_UNSAFE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F))  # code points, inclusive

# tool_choice "auto": free text until the model opens a call, constrained from the open tag on;
# or, as llama.cpp's Hermes handler also watches for, an answer that starts as a bare call
# object (`{"name"`, perhaps in a code fence), constrained from its `{` on. Small models
# (Qwen2.5-Coder-0.5B under OpenClaw) write calls that way and then invent the tool's name.
# llama.cpp matches a pattern wrapped in ^...$ against the whole text so far (any other pattern
# anywhere in it), and the grammar starts at the first group that matched.
TOOL_CALL_TRIGGER = (
    r"^(?:[\s\S]*?(" + re.escape(TOOL_CALL_OPEN) + r")[\s\S]*"
    r'|\s*(?:```[A-Za-z]*\s*)?(\{)\s*"name"[\s\S]*)$'
)

_GBNF_TOKEN = re.compile(
    r""""(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[^}]*\}|\#[^\n]*|[A-Za-z0-9-]+|[\s\S]"""
)


class GrammarError(BadInput):
    """A schema that cannot become a grammar (HTTP 400 when it came as `response_format`)."""


# --- cleaning --------------------------------------------------------------------------------


def clean_schema(schema: object) -> dict[str, object]:
    """Make a tool/response schema one the converter and llama.cpp's grammar engine accept.

    The result uses only keywords the converter implements, with every `$ref` pointing into its
    own `$defs`; it never shares objects with the input, which is left untouched.
    """
    return _Cleaner(schema).run()


def _any() -> dict[str, object]:
    return {"type": list(ANY_TYPES)}


def _json_value(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _bound(value: object) -> int | None:
    """A usable repetition bound: a non-negative integer no larger than REPEAT_CAP."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    number = int(value)
    return number if 0 <= number <= REPEAT_CAP else None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Both schemas at once, approximately (allOf, and siblings of anyOf): properties and
    required are combined, types intersected, any other keyword kept from `base` first."""
    out = dict(base)
    for key, value in extra.items():
        if key not in out:
            out[key] = value
        elif key == "properties" and isinstance(out[key], dict) and isinstance(value, dict):
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required" and isinstance(out[key], list) and isinstance(value, list):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key == "type":
            mine = out[key] if isinstance(out[key], list) else [out[key]]
            theirs = value if isinstance(value, list) else [value]
            both = [t for t in mine if t in theirs]
            if "number" in mine and "integer" in theirs:
                both.append("integer")
            if both:
                out[key] = both
    return out


class _Cleaner:
    """One clean_schema call: the original root (refs resolve against it) and the new `$defs`."""

    def __init__(self, root: object) -> None:
        self.root = root
        self.defs: dict[str, dict[str, object]] = {}
        self.ref_names: dict[str, str] = {}
        self.nodes = 0

    def run(self) -> dict[str, object]:
        out = self.clean(self.root, 0)
        if out is None:  # `false`: no value; a grammar cannot be empty, so accept any
            out = _any()
        if self.defs:
            out = {**out, "$defs": self.defs}
        return out

    def clean(self, node: object, depth: int) -> dict[str, object] | None:
        """The cleaned sub-schema, or None for one no value matches (`false`)."""
        self.nodes += 1
        if node is False:
            return None
        if not isinstance(node, dict) or depth > MAX_DEPTH or self.nodes > MAX_NODES:
            return _any()
        if "$ref" in node:
            name = self.ref(node["$ref"], depth)
            return _any() if name is None else {"$ref": f"#/$defs/{name}"}
        if isinstance(node.get("allOf"), list) and node["allOf"]:
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for part in node["allOf"]:
                target = self.deref(part)
                if target is False:
                    return None
                if isinstance(target, dict):
                    merged = _merge(merged, target)
            return self.clean(merged, depth + 1)
        alternatives = node.get("anyOf", node.get("oneOf"))
        if isinstance(alternatives, list) and alternatives:
            return self.union(node, alternatives, depth)
        if "const" in node and _json_value(node["const"]):
            return {"const": copy.deepcopy(node["const"])}
        if isinstance(node.get("enum"), list):
            values = [copy.deepcopy(v) for v in node["enum"] if _json_value(v)]
            if values:
                return {"enum": values}
        types = self.types(node)
        if len(types) > 1:
            if not set(node) - _ANNOTATIONS - {"type", "nullable"}:
                return {"type": types}
            rest = {k: v for k, v in node.items() if k not in ("type", "nullable")}
            return self.union(rest, [{"type": t} for t in types], depth)
        return self.typed(types[0], node, depth)

    def union(
        self, node: dict[str, Any], alternatives: list[Any], depth: int
    ) -> dict[str, object] | None:
        """anyOf/oneOf (oneOf read as anyOf); sibling keywords are distributed into each
        alternative, since the converter ignores them."""
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
        constrains = bool(set(rest) - _ANNOTATIONS)
        cleaned = []
        for alt in alternatives:
            target = self.deref(alt) if constrains else alt
            if constrains and isinstance(target, dict):
                target = _merge(rest, target)
            elif constrains and target is not False:
                target = rest
            out = self.clean(target, depth + 1)
            if out is not None and out not in cleaned:
                cleaned.append(out)
        if not cleaned:
            return None
        return cleaned[0] if len(cleaned) == 1 else {"anyOf": cleaned}

    def types(self, node: dict[str, Any]) -> list[str]:
        raw = node.get("type")
        listed = raw if isinstance(raw, list) else [raw]
        types = list(dict.fromkeys(t for t in listed if isinstance(t, str) and t in _TYPES))
        if not types:
            hinted = [t for t, keys in _TYPE_HINTS if any(k in node for k in keys)]
            types = hinted[:1] or list(ANY_TYPES)
        if node.get("nullable") is True and "null" not in types:
            types.append("null")
        return types

    def typed(self, kind: str, node: dict[str, Any], depth: int) -> dict[str, object] | None:
        if kind == "object":
            return self.object_schema(node, depth)
        if kind == "array":
            return self.array_schema(node, depth)
        if kind == "string":
            return _string(node)
        if kind == "integer":
            return _integer(node)
        return {"type": kind}

    def object_schema(self, node: dict[str, Any], depth: int) -> dict[str, object] | None:
        out: dict[str, object] = {"type": "object"}
        props: dict[str, object] = {}
        if isinstance(node.get("properties"), dict):
            for name, sub in node["properties"].items():
                cleaned = self.clean(sub, depth + 1)
                if isinstance(name, str) and cleaned is not None:
                    props[name] = cleaned
            out["properties"] = props
        required = node.get("required")
        if isinstance(required, list):
            # The converter can only require listed properties; a required `false` property
            # makes the schema unsatisfiable, and a grammar must accept something.
            names = [n for n in dict.fromkeys(required) if isinstance(n, str) and n in props]
            if names:
                out["required"] = names
        extra = node.get("additionalProperties")
        extra_out: object = None
        if extra is True or extra is False:
            extra_out = extra
        elif isinstance(extra, dict):
            cleaned_extra = self.clean(extra, depth + 1)
            extra_out = False if cleaned_extra is None else cleaned_extra
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and patterns and extra_out is not True:
            # A grammar cannot check key names against regexes: any key may take any of the
            # pattern schemas (or the additionalProperties one) instead.
            schemas = [c for c in (self.clean(s, depth + 1) for s in patterns.values()) if c]
            if isinstance(extra_out, dict):
                schemas.append(extra_out)
            if schemas:
                extra_out = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        if extra_out is not None:
            out["additionalProperties"] = extra_out
        return out

    def array_schema(self, node: dict[str, Any], depth: int) -> dict[str, object] | None:
        out: dict[str, object] = {"type": "array"}
        tuple_items = node.get("prefixItems")
        if not isinstance(tuple_items, list) and isinstance(node.get("items"), list):
            tuple_items = node["items"]  # draft-4 tuple form
        if isinstance(tuple_items, list) and tuple_items:
            cleaned = [self.clean(item, depth + 1) for item in tuple_items]
            out["prefixItems"] = [_any() if c is None else c for c in cleaned]
            return out
        items = node.get("items", True)
        cleaned_items = self.clean(items, depth + 1) if items is not True else _any()
        out["items"] = _any() if cleaned_items is None else cleaned_items
        low, high = _bound(node.get("minItems")), _bound(node.get("maxItems"))
        if cleaned_items is None:
            low, high = None, 0  # `items: false`: only the empty array
        if low is not None and high is not None and low > high:
            low = high = None  # unsatisfiable: a grammar must accept something
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out

    def ref(self, ref: object, depth: int) -> str | None:
        """The `$defs` name of a local ref's cleaned target (cleaned once; recursion allowed)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None
        if ref in self.ref_names:
            return self.ref_names[ref]
        target = _pointer(self.root, ref[1:])
        if target is _MISSING:
            return None
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", ref.rsplit("/", 1)[-1]).strip("-") or "def"
        name, n = stem, 1
        while name in self.defs:
            n += 1
            name = f"{stem}-{n}"
        self.ref_names[ref] = name
        self.defs[name] = _any()  # reserved while the target (maybe recursive) is cleaned
        cleaned = self.clean(target, depth + 1)
        self.defs[name] = _any() if cleaned is None else cleaned
        return name

    def deref(self, node: object) -> object:
        """A sub-schema with its `$ref` chain followed (for merging, which needs the content)."""
        for _ in range(8):
            if not isinstance(node, dict) or not isinstance(node.get("$ref"), str):
                return node
            ref = node["$ref"]
            target = _pointer(self.root, ref[1:]) if ref.startswith("#") else _MISSING
            if target is _MISSING:
                return True
            node = target
        return True


_MISSING = object()


def _pointer(root: object, pointer: str) -> object:
    """A JSON Pointer (RFC 6901) lookup; `_MISSING` when it does not resolve."""
    node = root
    if not pointer:
        return node
    if not pointer.startswith("/"):
        return _MISSING
    for raw in pointer[1:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return _MISSING
    return node


def _integer(node: dict[str, Any]) -> dict[str, object]:
    """An integer with its bounds as inclusive integers, kept for ranges from zero up (the
    converter's integers have no bounds; `integer_range` writes them: OpenClaw's `read` wants
    `offset >= 1`, and Qwen wrote 0 and got the tool's validation error back). Bounds it
    cannot use (a negative minimum, none at all) are dropped, never the schema."""
    out: dict[str, object] = {"type": "integer"}
    low = _int_bound(node.get("minimum"), math.ceil)
    high = _int_bound(node.get("maximum"), math.floor)
    above = _int_bound(node.get("exclusiveMinimum"), math.floor)
    below = _int_bound(node.get("exclusiveMaximum"), math.ceil)
    if above is not None:
        low = above + 1 if low is None else max(low, above + 1)
    if below is not None:
        high = below - 1 if high is None else min(high, below - 1)
    if low is None or low < 0 or (high is not None and high < low):
        return out  # only non-negative ranges become rules; unsatisfiable ones are the tool's
    out["minimum"] = low
    if high is not None:
        out["maximum"] = high
    return out


INT_DIGITS = 16  # the converter's integers have at most 16 digits
INT_BOUND_LIMIT = 10**15  # beyond this a bound is no constraint a model meets by chance


def _int_bound(value: object, rounding: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    bound = int(rounding(value))
    return bound if abs(bound) <= INT_BOUND_LIMIT else None


def integer_range(low: int, high: int | None) -> str:
    """A GBNF expression for the decimal integers in [low, high] (high None: unbounded), low
    >= 0, without leading zeros: per digit count, the numbers between that count's bounds."""
    top = high if high is not None else 10**INT_DIGITS - 1
    parts = []
    for digits in range(len(str(low)), len(str(top)) + 1):
        first = low if digits == len(str(low)) else 10 ** (digits - 1)
        last = top if digits == len(str(top)) else 10**digits - 1
        if high is None and first == 10 ** (digits - 1):  # every longer number: one rule
            parts.append(
                f"[1-9] [0-9]{{{digits - 1},{INT_DIGITS - 1}}}"
                if digits > 1
                else f"[1-9] [0-9]{{0,{INT_DIGITS - 1}}}"
            )
            break
        parts.append(_digits_between(str(first), str(last)))
    return " | ".join(f"({part})" for part in parts)


def _digits_between(a: str, b: str) -> str:
    """Strings of len(a) == len(b) digits from a to b inclusive, a <= b."""
    if not a:
        return '""'
    if a[0] == b[0]:
        rest = _digits_between(a[1:], b[1:]) if len(a) > 1 else None
        return f'"{a[0]}"' + (f" ({rest})" if rest else "")
    tail = len(a) - 1
    options = [f'"{a[0]}"' + (f" ({_digits_between(a[1:], '9' * tail)})" if tail else "")]
    if int(a[0]) + 1 <= int(b[0]) - 1:
        middle = f"[{int(a[0]) + 1}-{int(b[0]) - 1}]"
        options.append(middle + (f" [0-9]{{{tail}}}" if tail else ""))
    options.append(f'"{b[0]}"' + (f" ({_digits_between('0' * tail, b[1:])})" if tail else ""))
    return " | ".join(options)


def _string(node: dict[str, Any]) -> dict[str, object]:
    out: dict[str, object] = {"type": "string"}
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        safe = _safe_pattern(pattern)
        if safe is not None and _converts({"type": "string", "pattern": safe}):
            out["pattern"] = safe
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS:
        out["format"] = fmt
    low, high = _bound(node.get("minLength")), _bound(node.get("maxLength"))
    if low is not None and high is not None and low > high:
        low = high = None
    if low:
        out["minLength"] = low
    if high is not None:
        out["maxLength"] = high
    return out


# --- patterns --------------------------------------------------------------------------------


class _Unsupported(Exception):
    """A regex construct the converter or a JSON string grammar cannot express."""


_SHORTHANDS = {
    "d": ((0x30, 0x39),),
    "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
    "s": ((0x20, 0x20),),  # only the space: other whitespace is escaped in JSON text
}
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def _safe_pattern(pattern: str) -> str | None:
    """`pattern` rewritten so that the converter's translation is valid GBNF whose matches are
    valid JSON string contents, or None when that is not possible (then it is dropped).

    Only anchored patterns (^...$) are kept: an unanchored one means "contains", which a grammar
    cannot say cheaply. Escapes become character classes in GBNF's own escapes, negated classes
    and `.` exclude what JSON must escape, `(?:` becomes `(`, lazy quantifiers greedy ones, and
    bounds above REPEAT_CAP are dropped.
    """
    body = pattern[1:-1]
    trailing_escapes = len(body) - len(body.rstrip("\\"))
    if not (pattern.startswith("^") and pattern.endswith("$")) or len(pattern) < 2:
        return None
    if trailing_escapes % 2:
        return None  # the final `$` is an escaped dollar, not an anchor
    try:
        return "^" + _rewrite(body) + "$"
    except _Unsupported:
        return None


def _rewrite(body: str) -> str:
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == "\\":
            ranges, negated, i = _escape(body, i, in_class=False)
            out.append(_class(ranges, negated))
        elif c == "[":
            text, i = _bracket(body, i)
            out.append(text)
        elif c == "(":
            if body.startswith("(?:", i):
                i += 3
            elif body.startswith("(?", i):
                raise _Unsupported("lookaround or named group")
            else:
                i += 1
            out.append("(")
        elif c in ")|.":
            out.append(c)
            i += 1
        elif c in "*+?{":
            if c == "{":
                match = _QUANTIFIER.match(body, i)
                if match is None:
                    raise _Unsupported("bad quantifier")
                low = int(match.group(1))
                high = low if match.group(2) is None else int(match.group(3) or -1)
                if low > REPEAT_CAP or (0 <= high < low):
                    raise _Unsupported("repetition too large")
                upper = "" if high < 0 or high > REPEAT_CAP else str(high)
                out.append(f"{{{low}}}" if high == low else f"{{{low},{upper}}}")
                i = match.end()
            else:
                out.append(c)
                i += 1
            if i < n and body[i] == "?":
                i += 1  # lazy: the same strings match
            elif i < n and body[i] == "+":
                raise _Unsupported("possessive quantifier")
        elif c in "^$]}" or c == '"' or ord(c) < 0x20 or c == "\x7f":
            raise _Unsupported(f"character {c!r}")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _escape(body: str, i: int, *, in_class: bool) -> tuple[list[tuple[int, int]], bool, int]:
    """The escape at body[i] as (code point ranges, negated, next index)."""
    if i + 1 >= len(body):
        raise _Unsupported("trailing backslash")
    d = body[i + 1]
    if d in _SHORTHANDS:
        return list(_SHORTHANDS[d]), False, i + 2
    if d.lower() in _SHORTHANDS:
        if in_class:
            raise _Unsupported("negated shorthand in a class")
        return list(_SHORTHANDS[d.lower()]), True, i + 2
    if d in "xu":
        width = 2 if d == "x" else 4
        digits = body[i + 2 : i + 2 + width]
        if len(digits) != width or not all(h in "0123456789abcdefABCDEF" for h in digits):
            raise _Unsupported("bad hex escape")
        cp = int(digits, 16)
        return [(cp, cp)], False, i + 2 + width
    if d.isalnum() or d == "_" or ord(d) < 0x20:
        raise _Unsupported(f"escape \\{d}")  # \b \n \t \p, back-references, ...
    return [(ord(d), ord(d))], False, i + 2


def _bracket(body: str, i: int) -> tuple[str, int]:
    """The character class at body[i] ("[...]") as safe GBNF class text, and the next index."""
    j, n = i + 1, len(body)
    negated = j < n and body[j] == "^"
    j += negated
    if j < n and body[j] == "]":
        raise _Unsupported("empty class or leading ]")
    ranges: list[tuple[int, int]] = []
    while True:
        if j >= n:
            raise _Unsupported("unterminated class")
        if body[j] == "]":
            return _class(ranges, negated), j + 1
        if body[j] == "\\":
            atom, _, j = _escape(body, j, in_class=True)
        else:
            atom, j = [(ord(body[j]), ord(body[j]))], j + 1
        single = len(atom) == 1 and atom[0][0] == atom[0][1]
        if single and body.startswith("-", j) and j + 1 < n and body[j + 1] != "]":
            if body[j + 1] == "\\":
                end, _, j = _escape(body, j + 1, in_class=True)
            else:
                end, j = [(ord(body[j + 1]), ord(body[j + 1]))], j + 2
            if len(end) != 1 or end[0][0] != end[0][1] or end[0][0] < atom[0][0]:
                raise _Unsupported("bad range")
            atom = [(atom[0][0], end[0][0])]
        ranges.extend(atom)


def _normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _subtract(
    ranges: list[tuple[int, int]], holes: tuple[tuple[int, int], ...]
) -> list[tuple[int, int]]:
    out = _normalize(ranges)
    for h_low, h_high in holes:
        cut: list[tuple[int, int]] = []
        for low, high in out:
            if high < h_low or low > h_high:
                cut.append((low, high))
                continue
            if low < h_low:
                cut.append((low, h_low - 1))
            if high > h_high:
                cut.append((h_high + 1, high))
        out = cut
    return out


def _class(ranges: list[tuple[int, int]], negated: bool) -> str:
    """A GBNF character class: a positive one loses the characters JSON must escape, a negated
    one excludes them too."""
    if negated:
        ranges = _normalize([*ranges, *_UNSAFE])
    else:
        ranges = _subtract(ranges, _UNSAFE)
        if not ranges:
            raise _Unsupported("class of characters JSON must escape")
    items = "".join(
        _class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"
        for low, high in ranges
    )
    return f"[{'^' if negated else ''}{items}]"


def _class_char(cp: int) -> str:
    if cp < 0x80 and chr(cp).isalnum():
        return chr(cp)
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


# --- conversion ------------------------------------------------------------------------------


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal (every character llama.cpp's parser would misread is
    escaped)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@functools.cache
def _converter_class() -> Any:
    """The converter with its `$ref` naming and literal escaping fixed (built on first use:
    importing llama_cpp loads the native library)."""
    from llama_cpp.llama_grammar import SchemaConverter

    class Converter(SchemaConverter):
        def _format_literal(self, literal: str) -> str:
            return gbnf_literal(literal)

        def visit(self, schema: Any, name: str) -> str:
            me: Any = self
            if isinstance(schema, dict) and schema.get("type") == "integer" and "minimum" in schema:
                body = integer_range(schema["minimum"], schema.get("maximum"))
                return str(me._add_rule(name or "root", f"({body}) space"))
            return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

        def _resolve_ref(self, ref: str) -> str:
            me: Any = self
            names: dict[str, str] = me.__dict__.setdefault("_ref_rules", {})
            if ref not in names:
                # A placeholder body unique to this ref reserves a fresh name even when a rule
                # of the same name exists; recursion back to `ref` finds it in `names`.
                key = me._add_rule("ref-" + ref.rsplit("/", 1)[-1], f"<{ref}>")
                names[ref] = key
                me._rules[key] = me.visit(me._refs[ref], key + "-value")
            return names[ref]

    return Converter


def _convert(schema: dict[str, object]) -> str:
    """A cleaned schema as a standalone GBNF grammar (rule `root`), not yet checked."""
    from llama_cpp.llama_grammar import DOT, PRIMITIVE_RULES

    converter = _converter_class()(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    defs = schema.get("$defs")
    if isinstance(defs, dict):
        converter._refs.update({f"#/$defs/{name}": sub for name, sub in defs.items()})
    top = converter.visit(schema, "root")
    rules: dict[str, str] = dict(converter._rules)
    for name, body in rules.items():
        if body == PRIMITIVE_RULES["char"].content:
            rules[name] = _SAFE_CHAR
        elif body == DOT:
            rules[name] = _SAFE_DOT
    if top != "root":
        rules["root"] = top
    return "\n".join(f"{name} ::= {body}" for name, body in sorted(rules.items())) + "\n"


def _converts(schema: dict[str, object]) -> bool:
    """Whether the converter takes `schema` without failing (it asserts on what it cannot read)."""
    try:
        _convert(schema)
    except Exception:
        return False
    return True


def parses(gbnf: str) -> bool:
    """Whether llama.cpp's own grammar parser accepts `gbnf` with root `root` (undefined rules,
    bad escapes, left recursion, excessive repetition). Parsing needs no vocabulary."""
    import llama_cpp

    lib: Any = llama_cpp
    sampler = lib.llama_sampler_init_grammar(None, gbnf.encode(), b"root")
    if not sampler:
        return False
    lib.llama_sampler_free(sampler)
    return True


def _strip_patterns(schema: dict[str, object]) -> dict[str, object]:
    """A cleaned schema without its `pattern`s (walking only sub-schema positions, so that a
    property or a const value named "pattern" stays)."""
    out = {k: v for k, v in schema.items() if k != "pattern"}
    for key in ("properties", "$defs"):
        subs = out.get(key)
        if isinstance(subs, dict):
            out[key] = {name: _strip_patterns(sub) for name, sub in subs.items()}
    for key in ("items", "additionalProperties"):
        sub = out.get(key)
        if isinstance(sub, dict):
            out[key] = _strip_patterns(sub)
    for key in ("prefixItems", "anyOf"):
        subs = out.get(key)
        if isinstance(subs, list):
            out[key] = [_strip_patterns(sub) for sub in subs]
    return out


@functools.lru_cache(maxsize=256)
def _rules_from_text(text: str) -> tuple[str | None, str]:
    """(grammar, "") or (None, why not): clients resend the same tools with every turn."""
    try:
        return _build_rules(json.loads(text)), ""
    except GrammarError as exc:
        return None, exc.message


def _build_rules(schema: object) -> str:
    cleaned = clean_schema(schema)
    attempts = [cleaned]
    stripped = _strip_patterns(cleaned)
    if stripped != cleaned:  # a pattern may be what llama.cpp refused
        attempts.append(stripped)
    for attempt in attempts:
        try:
            gbnf = _convert(attempt)
        except Exception:  # the converter asserts, indexes and recurses freely
            continue
        if len(gbnf) > MAX_RULES_CHARS:
            raise GrammarError(f"the schema's grammar is too large ({len(gbnf)} characters)")
        if parses(gbnf):
            return gbnf
    raise GrammarError("the schema cannot be turned into a grammar (is it recursive on the left?)")


def schema_rules(schema: object) -> str:
    """GBNF text with rule `root` for the values matching `schema` (after `clean_schema`),
    checked by llama.cpp's parser. Raises GrammarError."""
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return _build_rules(schema)  # not JSON-shaped: uncached; cleaning copes
    rules, problem = _rules_from_text(text)
    if rules is None:
        raise GrammarError(problem)
    return rules


def prefix_rules(gbnf: str, prefix: str) -> str:
    """`gbnf` with every rule name (definitions and references) prefixed, comments dropped: how
    one grammar is embedded in another without rule-name clashes."""
    out = []
    for token in _GBNF_TOKEN.findall(gbnf):
        if token.startswith("#"):
            continue
        if token[0].isalnum() or token[0] == "-":
            token = prefix + token
        out.append(token)
    return "".join(out)


# --- grammars --------------------------------------------------------------------------------


def _any_object() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_grammar(schema: object | None) -> Grammar:
    """response_format: None -> any JSON object (json_object mode); a schema -> that schema.
    Non-lazy (trigger None). Raises GrammarError for a schema that cannot be compiled."""
    return Grammar(_any_object() if schema is None else schema_rules(schema))


def _arguments_rules(tool: ToolSpec) -> tuple[str, str | None]:
    """A tool's arguments grammar, or any JSON object and the reason it fell back to that."""
    try:
        schema = json.loads(tool.parameters)
    except (ValueError, RecursionError):
        return _any_object(), "its parameters are not JSON"
    if schema == {}:
        return _any_object(), None
    cleaned = clean_schema(schema)
    if cleaned.get("type") != "object" and "$ref" not in cleaned and "anyOf" not in cleaned:
        return _any_object(), "its parameters schema does not describe an object"
    try:
        return schema_rules(schema), None
    except GrammarError as exc:
        return _any_object(), exc.message


def tool_call_grammar(
    tools: Sequence[ToolSpec], *, parallel: bool, lazy: bool, only: str | None = None
) -> tuple[Grammar, list[str]]:
    """The grammar for one call (or, if `parallel`, one or more separated by "\\n") written as

        <tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>

    with one alternative per tool: its name literal, then its own arguments rule. `only`
    restricts it to the tool of that name (tool_choice by name). `lazy` (tool_choice auto)
    leaves text free until the open tag; otherwise the output starts with the call.

    Returns warnings: one line per tool whose schema could not be compiled even after cleaning;
    such a tool's arguments are any JSON object, so a bad schema never fails the request.

    Remembered for the last calls' tools: an agent sends the same tools with every call, and
    building OpenClaw's 12 tools' grammar costs ~20 ms on a small CPU, on each call's path.
    """
    grammar, warnings = _tool_call_grammar(tuple(tools), parallel, lazy, only)
    return grammar, list(warnings)


@functools.lru_cache(maxsize=64)
def _tool_call_grammar(
    tools: tuple[ToolSpec, ...], parallel: bool, lazy: bool, only: str | None
) -> tuple[Grammar, tuple[str, ...]]:
    if not tools:
        raise BadInput("a tool-call grammar needs at least one tool", param="tools")
    chosen = [tool for tool in tools if only is None or tool.name == only]
    if not chosen:
        raise BadInput(
            f"tool_choice names {only!r}, which is not a tool offered", param="tool_choice"
        )
    warnings: list[str] = []
    names: list[str] = []
    bare_names: list[str] = []
    blocks: list[str] = []
    colon = gbnf_literal(":")
    for i, tool in enumerate(chosen):
        rules, problem = _arguments_rules(tool)
        if problem is not None:
            warnings.append(f"tool {tool.name!r}: {problem}; its arguments accept any JSON object")
        name = json.dumps(tool.name, ensure_ascii=False)
        head = name + ', "arguments": '
        names.append(f"fn-{i}")
        blocks.append(
            f"fn-{i} ::= {gbnf_literal(head)} a{i}-root\n" + prefix_rules(rules, f"a{i}-")
        )
        if lazy:  # the same call as a bare object, in whatever spacing the model began it
            bare_names.append(f"bfn-{i}")
            comma, key = gbnf_literal(","), gbnf_literal('"arguments"')
            blocks.append(
                f"bfn-{i} ::= {gbnf_literal(name)} ws {comma} ws {key} ws {colon} ws a{i}-root"
            )
    opening = gbnf_literal(TOOL_CALL_OPEN + '\n{"name": ')
    closing = gbnf_literal("}\n" + TOOL_CALL_CLOSE)
    header = [
        "root ::= call" + (' ("\\n" call)*' if parallel else "") + (" | bare" if lazy else ""),
        f"call ::= {opening} ({' | '.join(names)}) {closing}",
    ]
    if lazy:
        brace, key, fence = gbnf_literal("{"), gbnf_literal('"name"'), gbnf_literal("```")
        header += [
            f"bare ::= {brace} ws {key} ws {colon} ws ({' | '.join(bare_names)}) ws "
            f"{gbnf_literal('}')} (ws {fence})?",
            "ws ::= [ \\t\\n]{0,16}",
        ]
    gbnf = "\n".join(header) + "\n" + "\n".join(blocks)
    if not parses(gbnf):  # each part parsed on its own: this would be a bug here
        raise GrammarError("the tool-call grammar could not be compiled")
    return Grammar(gbnf, TOOL_CALL_TRIGGER if lazy else None), tuple(warnings)
