"""Tool-calling accuracy on the Berkeley Function Calling Leaderboard's own data (PyPI
`bfcl-eval`): its simple, multiple, parallel and irrelevance categories, the first `--per`
questions of each, through clawd and llama-server (`--jinja`) with Qwen2.5-Coder-0.5B, greedy,
`tool_choice: auto`, as an agent sends them.

Scored like BFCL's AST checker, simplified: a call matches when its function name is the
expected one and every argument is one of the values the answer file allows (an allowed ""
means the argument may be left out), with no argument the function does not expect; parallel
calls match in any order; an irrelevance question is right when no call is made. "Valid" counts
calls that parse as JSON objects matching their tool's schema (types, required, enums).

    python bench/tool_accuracy.py --per 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from agents import MODEL, TOKEN, Server, clawd_server, fresh_home, llama_server
from foundation import machine
from llama_server import ensure_llama_server

from clawctl.paths import Paths
from clawctl.store.models import ModelStore

BFCL = "bfcl-eval==2026.3.23"
CATEGORIES = ("simple_python", "multiple", "parallel", "irrelevance")
TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def bfcl_data(cache: Path) -> Path:
    """The package's data directory (downloaded once from PyPI into `cache`)."""
    target = cache / "bfcl_eval" / "data"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", BFCL, "-d", str(cache)],
        check=True,
        capture_output=True,
    )
    wheel = next(cache.glob("bfcl_eval-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("bfcl_eval/data/"):
                archive.extract(name, cache)
    return target


def _schema(node: Any) -> Any:
    """BFCL's Python-flavoured schema as JSON Schema (its own OpenAI handler does the same)."""
    if isinstance(node, dict):
        out = {k: _schema(v) for k, v in node.items() if k != "optional"}
        if isinstance(out.get("type"), str):
            out["type"] = TYPES.get(out["type"], out["type"])
        return out
    if isinstance(node, list):
        return [_schema(v) for v in node]
    return node


def _wire(name: str) -> str:
    return name.replace(".", "_")  # OpenAI function names allow no dots


@dataclass
class Question:
    id: str
    category: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    expected: list[dict[str, dict[str, list[Any]]]] = field(default_factory=list)


def questions(data: Path, per: int) -> list[Question]:
    out = []
    for category in CATEGORIES:
        rows = [json.loads(line) for line in (data / f"BFCL_v4_{category}.json").open()][:per]
        answers: dict[str, Any] = {}
        answer_file = data / "possible_answer" / f"BFCL_v4_{category}.json"
        if answer_file.exists():
            answers = {a["id"]: a["ground_truth"] for a in map(json.loads, answer_file.open())}
        for row in rows:
            tools = [
                {
                    "type": "function",
                    "function": {
                        "name": _wire(f["name"]),
                        "description": f.get("description", ""),
                        "parameters": _schema(f["parameters"]),
                    },
                }
                for f in row["function"]
            ]
            expected = [
                {_wire(name): args for name, args in call.items()}
                for call in answers.get(row["id"], [])
            ]
            out.append(Question(row["id"], category, row["question"][0], tools, expected))
    return out


def _arg_matches(value: Any, allowed: list[Any]) -> bool:
    for option in allowed:
        numbers = isinstance(value, int | float) and isinstance(option, int | float)
        if isinstance(option, float) or isinstance(value, float):
            if numbers and abs(float(value) - float(option)) < 1e-9:
                return True
        elif isinstance(option, str) and isinstance(value, str):
            if option.strip().lower() == value.strip().lower():
                return True
        elif option == value:
            return True
    return False


def _call_matches(call: tuple[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> bool:
    name, args = call
    ((want_name, want_args),) = expected.items()
    if name != want_name:
        return False
    if any(key not in want_args for key in args):
        return False
    for key, allowed in want_args.items():
        if key in args:
            if not _arg_matches(args[key], allowed):
                return False
        elif "" not in allowed:
            return False
    return True


def exact(question: Question, calls: list[tuple[str, dict[str, Any]]]) -> bool:
    if question.category == "irrelevance":
        return not calls
    if len(calls) != len(question.expected):
        return False
    left = list(question.expected)
    for call in calls:
        match = next((e for e in left if _call_matches(call, e)), None)
        if match is None:
            return False
        left.remove(match)
    return True


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if isinstance(kind, str) and kind in checks and not checks[kind](value):
        return False
    return "enum" not in schema or value in schema["enum"]


def valid(question: Question, name: str, arguments: str) -> bool:
    """Whether a call names an offered tool and its arguments are a JSON object of its schema
    (required present, no unknown keys, top-level types and enums)."""
    tool = next((t["function"] for t in question.tools if t["function"]["name"] == name), None)
    if tool is None:
        return False
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return False
    if not isinstance(args, dict):
        return False
    props = tool["parameters"].get("properties", {})
    if any(key not in props for key in args):
        return False
    if any(key not in args for key in tool["parameters"].get("required", [])):
        return False
    return all(_type_ok(args[k], props[k]) for k in args)


@dataclass
class Score:
    questions: int = 0
    exact: int = 0
    calls: int = 0
    valid: int = 0
    as_text: int = 0  # answers with no calls whose text looks like one (a call lost as text)
    by_category: dict[str, list[int]] = field(default_factory=dict)


def run(server: Server, items: list[Question], extra: dict[str, Any]) -> Score:
    score = Score()
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    for q in items:
        body = {"model": MODEL, "messages": q.messages, "tools": q.tools, "tool_choice": "auto",
                "temperature": 0, "max_tokens": 256, **extra}  # fmt: skip
        reply = httpx.post(
            url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600
        ).json()
        message = reply["choices"][0]["message"]
        raw = message.get("tool_calls") or []
        calls = []
        for call in raw:
            fn = call["function"]
            score.calls += 1
            score.valid += valid(q, fn["name"], fn.get("arguments") or "{}")
            try:
                calls.append((fn["name"], json.loads(fn.get("arguments") or "{}")))
            except ValueError:
                calls.append((fn["name"], {}))
        if not raw and '"name"' in (message.get("content") or ""):
            score.as_text += 1
        right = exact(q, calls)
        score.questions += 1
        score.exact += right
        score.by_category.setdefault(q.category, [0, 0])
        score.by_category[q.category][0] += right
        score.by_category[q.category][1] += 1
    return score


def write_results(scores: dict[str, Score], per: int) -> None:
    lines = [
        "## Tool calling accuracy: BFCL questions, clawd vs llama-server",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/tool_accuracy.py --per {per}`)",
        f"- Data: `{BFCL}` (PyPI), the first {per} questions of each of "
        + ", ".join(f"`{c}`" for c in CATEGORIES)
        + "; Qwen2.5-Coder-0.5B Q4_K_M, greedy, `tool_choice: auto`; llama-server `--jinja`",
        "- Exact: BFCL's AST check, simplified (names, allowed values, optional arguments, "
        "any order for parallel calls; irrelevance: no call). Valid: calls returned as "
        "`tool_calls` that name an offered tool with arguments matching its schema. As text: "
        "answers without calls whose text holds a call-like object",
        "",
        "| server | exact | "
        + " | ".join(CATEGORIES)
        + " | calls | valid calls | calls left as text |",
        "|---|---:|" + "---:|" * len(CATEGORIES) + "---:|---:|---:|",
    ]
    for name, s in scores.items():
        cats = " | ".join(
            f"{s.by_category.get(c, [0, 0])[0]}/{s.by_category.get(c, [0, 0])[1]}"
            for c in CATEGORIES
        )
        valid_share = f"{s.valid}/{s.calls}" if s.calls else "0/0"
        lines.append(
            f"| {name} | {s.exact}/{s.questions} | {cats} | {s.calls} | {valid_share} "
            f"| {s.as_text} |"
        )
    mine, theirs = scores["clawd"], scores["llama-server"]
    lines += [
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| every call clawd emits is valid | {mine.valid}/{mine.calls} "
        f"| {'yes' if mine.valid == mine.calls else 'no'} |",
        f"| clawd exact match >= llama-server's | {mine.exact} vs {theirs.exact} "
        f"| {'yes' if mine.exact >= theirs.exact else 'no'} |",
    ]
    write_section("tool-accuracy", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per", type=int, default=10)
    args = parser.parse_args()
    data = bfcl_data(Paths.build().download_cache / "bfcl")
    items = questions(data, args.per)
    work = Path(tempfile.mkdtemp(prefix="bench-tools-"))
    scores: dict[str, Score] = {}
    try:
        models_home = work / "models-home"
        store = ModelStore(Paths.build(models_home))
        store.pull(MODEL)
        clawd = clawd_server(fresh_home(models_home / "data" / "models", work), work)
        clawd.start()
        try:
            scores["clawd"] = run(clawd, items, {"claw": {"cache": False}})
        finally:
            clawd.stop()
        binary = ensure_llama_server(Path(tempfile.gettempdir()) / "llama-server-build.log")
        server = llama_server(binary, store.model_file(MODEL))
        server.start()
        try:
            scores["llama-server"] = run(server, items, {})
        finally:
            server.stop()
        write_results(scores, args.per)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
