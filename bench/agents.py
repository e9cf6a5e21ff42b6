"""The agent workload: OpenClaw's own requests through clawd and through llama-server, side by side.

The requests are a real OpenClaw session (`openclaw agent --local`, openclaw@2026.9.6, default
workspace), recorded with bench/capture_proxy.py into bench/data/openclaw_session.jsonl: its first
call (system prompt ~40k characters, 12 tools, ~12k tokens), the call after its `read` tool step,
and a next user turn of the same session. Each call carries clawd's own earlier answers in place
of the recorded ones (`Echo`), as OpenClaw sends back what it got; llama-server gets exactly the
requests clawd got. Both servers run Qwen2.5-Coder-0.5B Q4_K_M with a 32k
context, one sequence, 2 threads, greedy; llama-server with `--jinja` and its prompt cache (on
by default). Per row: time to the first streamed delta (text or tool call), time to the end of
the answer (the complete tool call), prompt tokens, decode speed at that depth.

    python bench/agents.py --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from concurrency import free_port
from foundation import _stop, machine, wait_for
from llama_server import ensure_llama_server

from clawctl.paths import Paths
from clawctl.store.models import ModelStore

BIN = Path(sys.executable).parent
MODEL = "qwen2.5-coder-0.5b"
N_CTX = 32768
THREADS = 2
SESSION = Path(__file__).resolve().parent / "data" / "openclaw_session.jsonl"
TOKEN = "bench-token"
# Client time before a call, the same for both servers: the user reading the answer and typing
# the next message. The call after a tool step follows at once (a fast tool such as `read`:
# the least time a server gets to prepare for it).
PAUSE = {"next turn": 5.0, "turn after a text answer": 5.0}
# The session's last turn is followed by one more, built here from the answer clawd gave to it
# (the recording ends there): the turn in which anticipation can show, since the call carries
# exactly what clawd answered.
FOLLOW_UP = "[Sun 2026-12-06 21:10 UTC] Good. What was the name of the file you read?"
JSON_PROMPT = [
    {"role": "user", "content": "List eight European capitals with their countries, as JSON."}
]
CAPITALS = {
    "type": "object",
    "properties": {
        "capitals": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                "required": ["city", "country"],
            },
        }
    },
    "required": ["capitals"],
}


@dataclass
class Call:
    first_delta: float  # seconds to the first text or tool-call delta
    done: float  # seconds to the end of the stream
    prompt_tokens: int
    completion_tokens: int
    decode_tps: float  # the server's own decode speed
    tool_calls: int
    prefill: float  # the server's own time to the first token (its prompt processing), s
    computed: int  # prompt tokens the server computed (the rest it reused)
    answer: dict[str, Any] = field(default_factory=dict)  # the assistant message it streamed


def session() -> list[tuple[str, dict[str, Any]]]:
    rows = [json.loads(line) for line in SESSION.read_text().splitlines() if line.strip()]
    return [(row["name"], row["body"]) for row in rows]


def _message(text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed answer as the assistant message a client sends back."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["args"]}}
            for c in calls
        ]  # fmt: skip
    return message


class Echo:
    """The recorded session as a client sends it to one server: the assistant turn each call
    answered is replaced by that server's own answer in every later call (and the tool results
    name its call ids), as OpenClaw does. Only where the answer is of the recorded kind (a call
    of the same tools, or text): otherwise the recorded turn stays, so the session can go on."""

    def __init__(self) -> None:
        self.swaps: dict[str, dict[str, Any]] = {}
        self.ids: dict[str, str] = {}
        self.previous: list[dict[str, Any]] = []

    def body(self, recorded: dict[str, Any], answer: dict[str, Any] | None) -> dict[str, Any]:
        messages = recorded["messages"]
        new = next(
            (m for m in messages if m["role"] == "assistant" and m not in self.previous), None
        )
        if answer and new is not None and _kind(new) == _kind(answer):
            self.swaps[json.dumps(new, sort_keys=True)] = answer
            old = [c["id"] for c in new.get("tool_calls") or ()]
            self.ids.update(
                zip(old, [c["id"] for c in answer.get("tool_calls") or ()], strict=True)
            )
        self.previous = messages
        return {**recorded, "messages": [self._swap(m) for m in messages]}

    def _swap(self, message: dict[str, Any]) -> dict[str, Any]:
        swapped = self.swaps.get(json.dumps(message, sort_keys=True))
        if swapped is not None:
            return swapped
        if message["role"] == "tool" and message.get("tool_call_id") in self.ids:
            return {**message, "tool_call_id": self.ids[message["tool_call_id"]]}
        return message


def follow_up(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any] | None:
    """The next turn after `body`'s call was answered with `answer`, as OpenClaw sends it: the
    answer, a new user message with the same runtime line, then the internal-context message
    moved to the end again. None when the answer was not text (the session would need a tool
    result first)."""
    if _kind(answer) != ("text",) or not answer.get("content"):
        return None
    *history, user, internal = body["messages"]
    runtime = user["content"].partition("\n\nRuntime:")[2]
    asked = {"role": "user", "content": f"{FOLLOW_UP}\n\nRuntime:{runtime}"}
    return {**body, "messages": [*history, user, answer, asked, internal]}


def _kind(message: dict[str, Any]) -> tuple[str, ...]:
    """The tools a message calls, or ("text",) for a text answer."""
    calls = message.get("tool_calls") or ()
    return tuple(c["function"]["name"] for c in calls) if calls else ("text",)


class Server:
    """One OpenAI-compatible server on 127.0.0.1 that can be restarted."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int) -> None:
        self.name, self.command, self.env, self.port = name, command, env, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self._responds, timeout=300)

    def _responds(self) -> bool:
        """Up once it answers HTTP at all (clawd's routes want the token; llama-server's
        /health is 503 until its model is loaded)."""
        try:
            status = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code
        except httpx.HTTPError:
            return False
        return status != 503

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def call(self, body: dict[str, Any], extra: dict[str, Any] | None = None) -> Call:
        full = {**body, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        started = time.perf_counter()
        first: float | None = None
        usage: dict[str, Any] = {}
        decode = prefill = 0.0
        calls = computed = saved = 0
        text: list[str] = []
        made: dict[int, dict[str, Any]] = {}  # streamed tool calls by index
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        with httpx.stream("POST", url, json=full, headers=headers, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("tool_calls")):
                        first = time.perf_counter() - started
                    calls += sum(1 for c in delta.get("tool_calls") or () if c.get("id"))
                    text.append(delta.get("content") or "")
                    for piece in delta.get("tool_calls") or ():
                        call = made.setdefault(piece["index"], {"id": "", "name": "", "args": ""})
                        call["id"] = piece.get("id") or call["id"]
                        function = piece.get("function") or {}
                        call["name"] = function.get("name") or call["name"]
                        call["args"] += function.get("arguments") or ""
                usage = chunk.get("usage") or usage
                if chunk.get("claw"):
                    timings = chunk["claw"]["timings"]
                    decode = timings.get("decode_tokens_per_s") or 0.0
                    prefill = (timings["queue_ms"] + timings["prompt_ms"]) / 1000
                    saved = chunk["claw"].get("prefill_tokens_saved") or 0
                if chunk.get("timings"):  # llama-server's own
                    decode = chunk["timings"].get("predicted_per_second") or decode
                    prefill = chunk["timings"].get("prompt_ms", 0.0) / 1000
                    computed = int(chunk["timings"].get("prompt_n") or 0)
        done = time.perf_counter() - started
        return Call(
            first if first is not None else done,
            done,
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            float(decode),
            calls,
            float(prefill),
            computed or int(usage.get("prompt_tokens", 0)) - saved,
            _message("".join(text), [made[i] for i in sorted(made)]),
        )

    def warm(self) -> None:
        """Load the model (clawd loads on first use; llama-server at start) on an unrelated
        one-token prompt, so no row pays the load."""
        self.call({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 1, "temperature": 0})  # fmt: skip


def clawd_server(home: Path, work: Path) -> Server:
    port = free_port()
    (work / "token").write_text(TOKEN)
    config = work / "clawd.toml"
    config.write_text(f'[tcp]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{work / "token"}"\n')
    env = dict(
        os.environ,
        CLAW_HOME=str(home),
        CLAW_CONFIG=str(config),
        CLAW_SOCKET=str(work / "d.sock"),
        CLAW_PROFILE="x86-small",
    )
    return Server("clawd", [str(BIN / "clawd")], env, port)


def llama_server(binary: Path, model: Path) -> Server:
    port = free_port()
    command = [
        str(binary), "-m", str(model), "--jinja", "-c", str(N_CTX), "-np", "1",
        "-t", str(THREADS), "-tb", str(THREADS), "--no-webui",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    return Server("llama-server", command, dict(os.environ), port)


def fresh_home(models: Path, parent: Path) -> Path:
    """A clawd home with the model (hard links) and no state: nothing of the preamble computed."""
    home = Path(tempfile.mkdtemp(prefix="agents-home-", dir=parent))
    shutil.copytree(models, home / "data" / "models", copy_function=os.link)
    return home


Rows = dict[str, dict[str, list[Call]]]  # row -> server -> runs


def measure(runs: int, models: Path, binary: Path, work: Path) -> tuple[Rows, dict[str, Any]]:
    calls = session()
    rows: Rows = {}

    def add(row: str, server: str, call: Call) -> None:
        rows.setdefault(row, {}).setdefault(server, []).append(call)
        print(
            f"{row:<28} {server:<13} first {call.first_delta:7.2f}s done {call.done:7.2f}s "
            f"prompt {call.prompt_tokens} decode {call.decode_tps:.2f} tok/s",
            flush=True,
        )

    model_file = ModelStore(Paths.build(models.parent.parent)).model_file(MODEL)
    for _ in range(runs):
        # clawd: a fresh home each run, so its first call is cold; then the session; then a
        # restart, whose first call finds the preamble in the prefix pool on disk.
        home = fresh_home(models, work)
        clawd = clawd_server(home, work)
        clawd.start()
        try:
            clawd.warm()
            echo, answer, sent = Echo(), None, []
            for name, recorded in calls:
                body = echo.body(recorded, answer)
                sent.append((name, body))
                time.sleep(PAUSE.get(name, 0.0))
                call = clawd.call(body, {"claw": {"cache": False}})
                add(name, "clawd", call)
                answer = call.answer
            last = follow_up(sent[-1][1], answer) if answer else None
            if last is not None:
                name = "turn after a text answer"
                sent.append((name, last))
                time.sleep(PAUSE[name])
                add(name, "clawd", clawd.call(last, {"claw": {"cache": False}}))
            clawd.stop()
            clawd.start()
            clawd.warm()
            add(
                "first call after a restart",
                "clawd",
                clawd.call(calls[0][1], {"claw": {"cache": False}}),
            )
        finally:
            clawd.stop()
            shutil.rmtree(home, ignore_errors=True)
        # llama-server: started fresh each run (its cache lives in its process only, so its
        # first call after a restart is its cold first call, measured here).
        server = llama_server(binary, model_file)
        server.start()
        try:
            server.warm()
            for name, body in sent:  # the same requests clawd got
                time.sleep(PAUSE.get(name, 0.0))
                add(name, "llama-server", server.call(body))
        finally:
            server.stop()
    grammar = grammar_cost(runs, models, work)
    return rows, grammar


def grammar_cost(runs: int, models: Path, work: Path) -> dict[str, Any]:
    """Decode speed with and without a JSON-Schema grammar on the same prompt (clawd's own
    timing), interleaved, after one warm-up each."""
    home = fresh_home(models, work)
    clawd = clawd_server(home, work)
    clawd.start()
    speeds: dict[bool, list[float]] = {False: [], True: []}
    try:
        clawd.warm()
        for round_ in range(runs + 1):
            for constrained in (False, True):
                body: dict[str, Any] = {"model": MODEL, "messages": JSON_PROMPT,
                                        "max_tokens": 120, "temperature": 0}  # fmt: skip
                if constrained:
                    body["response_format"] = {
                        "type": "json_schema",
                        "json_schema": {"name": "capitals", "schema": CAPITALS},
                    }
                call = clawd.call(body, {"claw": {"cache": False, "speculative": False}})
                if round_:
                    speeds[constrained].append(call.decode_tps)
    finally:
        clawd.stop()
        shutil.rmtree(home, ignore_errors=True)
    free, held = statistics.median(speeds[False]), statistics.median(speeds[True])
    return {"free": free, "grammar": held, "ratio": held / free if free else 0.0}


def median(calls: list[Call], field: str) -> float:
    return statistics.median(float(getattr(c, field)) for c in calls)


def anticipation_note(rows: Rows) -> str:
    """What computing ahead saved, where the session lets it show."""
    row = "turn after a text answer"

    def computed(name: str, server: str) -> int:
        return int(median(rows[name][server], "computed"))

    head = (
        "- Computing less: while the client is away clawd computes the answer it gave as the "
        "next call will render it (anticipation, docs/agents.md). "
    )
    if row not in rows:
        return head + (
            "It could not show in this run: clawd's answer to the last recorded turn was not "
            "text, so no follow-up turn carrying it was sent."
        )
    return head + (
        f"The turn after a text answer carries clawd's own answer: clawd computed "
        f"{computed(row, 'clawd')} prompt tokens, llama-server {computed(row, 'llama-server')} "
        f"(its cache ends where its last prompt ended, before the answer). The recorded rows "
        f"carry the recording's text where clawd answered otherwise (the next turn: "
        f"{computed('next turn', 'clawd')} vs {computed('next turn', 'llama-server')}), and the "
        f"call after a tool step comes back at once, before the half second anticipation waits "
        f"after a call ({computed('after a tool step', 'clawd')} vs "
        f"{computed('after a tool step', 'llama-server')}). For the same tokens both are level: "
        "profiled on 2026-12-07, clawd's model thread spends 99% of such a call in "
        "`llama_decode` with llama-server's kernels; clawd's time also counts tokenizing the "
        "12k-token prompt (~20 ms) and queueing, which llama-server's `prompt_ms` does not."
    )


def write_results(rows: Rows, grammar: dict[str, Any], runs: int) -> None:
    lines = [
        "## Agents: OpenClaw's requests, clawd vs llama-server",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/agents.py --runs {runs}`)",
        "- Requests: a real OpenClaw session (openclaw@2026.9.6, default workspace, 12 tools, "
        "`tool_choice: auto`) recorded with bench/capture_proxy.py "
        "(bench/data/openclaw_session.jsonl), sent as OpenClaw sends them (streaming, usage), "
        "temperature 0, each call carrying clawd's own earlier answers where the recording had "
        "the same kind of answer (as OpenClaw sends back what it got; llama-server gets the same "
        "requests); Qwen2.5-Coder-0.5B Q4_K_M, 32k context, one sequence, 2 threads",
        "- llama-server: the llama.cpp llama-cpp-python vendors, `--jinja -c 32768 -np 1 -t 2`, "
        "prompt cache on; clawd: profile x86-small over TCP with a token, answer cache off",
        f"- Median of {runs} runs; each run starts both servers with nothing computed. "
        '"first token": the server\'s own time to its first token (queue and prompt '
        "processing: clawd's `claw.timings`, llama-server's `timings.prompt_ms`); "
        '"first delta": the first streamed text or tool-call delta the client saw; "done": '
        "the answer finished (a complete tool call where there is one); decode: the server's "
        "own tokens/s; computed: prompt tokens the server evaluated (clawd: prompt tokens less "
        "`claw.prefill_tokens_saved`; llama-server: `timings.prompt_n`). Client pauses, the "
        "same for both: none before the call after a tool step (a fast tool), "
        f"{PAUSE['next turn']:.0f} s before the next turn (the user reads and types)",
        "",
        "| request | server | prompt tokens | computed | first token s | first delta s | done s "
        "| decode tok/s | tool calls | first token vs llama-server |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    anchor_first = {row: median(by["llama-server"], "prefill")
                    for row, by in rows.items() if "llama-server" in by}  # fmt: skip
    anchor_first["first call after a restart"] = anchor_first.get("first call", 0.0)
    for row, by in rows.items():
        for server, calls in by.items():
            first = median(calls, "prefill")
            anchor = anchor_first.get(row) or 0.0
            ratio = f"{anchor / first:.2f}x" if server == "clawd" and first else "1.00x"
            lines.append(
                f"| {row} | {server} | {int(median(calls, 'prompt_tokens'))} "
                f"| {int(median(calls, 'computed'))} | {first:.2f} "
                f"| {median(calls, 'first_delta'):.2f} "
                f"| {median(calls, 'done'):.2f} | {median(calls, 'decode_tps'):.2f} "
                f"| {int(median(calls, 'tool_calls'))} | {ratio} |"
            )

    cold = median(rows["first call"]["clawd"], "prefill")
    second = median(rows["after a tool step"]["clawd"], "prefill")
    lines += [
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| clawd: call after a tool step >= 20x faster to first token than the first call "
        f"| {cold / second:.0f}x | {'yes' if cold / second >= 20 else 'no'} |",
    ]
    for row in ("first call", "after a tool step", "next turn", "turn after a text answer",
                "first call after a restart"):  # fmt: skip
        if row not in rows or row not in anchor_first:
            continue
        mine = median(rows[row]["clawd"], "prefill")
        theirs = anchor_first[row]
        lines.append(
            f"| {row}: clawd at least llama-server's speed | {theirs / mine:.2f}x "
            f"| {'yes' if mine <= theirs else 'no'} |"
        )
    # Decode at depth where both write the same kind of answer (text, the next user turn):
    # the first call's and the tool step's answers differ (a grammar-held call vs text).
    mine_tps = median(rows["next turn"]["clawd"], "decode_tps")
    theirs_tps = median(rows["next turn"]["llama-server"], "decode_tps")
    lines.append(
        f"| next turn: clawd decodes at 12k depth at least at llama-server's speed "
        f"| {mine_tps / theirs_tps:.2f}x | {'yes' if mine_tps >= theirs_tps else 'no'} |"
    )
    ratio = grammar["ratio"]
    lines += [
        f"| grammar-constrained decode >= 0.90x unconstrained (JSON Schema, "
        f"{grammar['grammar']:.1f} vs {grammar['free']:.1f} tok/s) | {ratio:.2f}x "
        f"| {'yes' if ratio >= 0.9 else 'no'} |",
        "",
        "### Notes",
        "",
        "- llama-server keeps its prompt cache in its process: after a restart its first call is "
        "its cold first call (the row above is that measurement). clawd's prefix pool is on "
        "disk, so its first call after a restart hydrates the preamble.",
        '- "first delta" for clawd on a tool call: the call\'s start (`{index, id, type, '
        "function.name}`), sent as soon as the model has written the name; its arguments "
        "follow as they are written.",
        '- "tool calls": calls returned as OpenAI `tool_calls` (not as text in `content`).',
        "- llama-server returned every call as text in `content` (0 `tool_calls`), and after the "
        "tool step, unconstrained, wrote on until its token limit; clawd's grammar-held call "
        'was complete in the time shown under "done".',
        anticipation_note(rows),
        "- Decode at depth (measured once on 2026-12-07): one token at 12k depth costs ~95 ms "
        "in llama.cpp on an AMD EPYC host, whether the KV is one pool or a stream; clawd's own "
        "per-token work is ~1% of its model thread. Prompt-lookup drafts are paced by the step "
        "costs clawd measures at each depth (docs/api.md): they run where the answer copies the "
        "context (after the tool step) and back off where they miss (free text). The first "
        "call's row is not like for like: clawd's answer is a grammar-held tool call, "
        "llama-server's text.",
    ]
    write_section("agents", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    try:
        models_home = work / "models-home"
        ModelStore(Paths.build(models_home)).pull(MODEL)
        binary = ensure_llama_server(Path(tempfile.gettempdir()) / "llama-server-build.log")
        rows, grammar = measure(args.runs, models_home / "data" / "models", binary, work)
        write_results(rows, grammar, args.runs)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
