"""Distillation end to end with the real SmolLM2 and real tools: `clawctl distill train` through a
real clawd (PEFT on the CPU in its build subprocess, killed mid-run and resumed from its
checkpoint), the GGUF conversion proved against PEFT, the adapter changing what clawd answers,
evaluation under a policy whose remote tier is a second clawd, promotion refused by the gate,
forced, rolled back; bad input as exit 2 with the stores unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from clawctl.build.distill.examples import split
from clawctl.build.distill.lora_gguf import permute_rows, write_lora_gguf
from clawctl.errors import BadInput
from clawctl.paths import Paths
from clawctl.schemas.distill import (
    ArmScore,
    DistillEvaluation,
    GateSettings,
    GateVerdict,
    TrainExample,
)
from clawctl.schemas.policy import EvalMessage
from clawctl.serving.distill import judge
from clawctl.store.models import ModelStore
from tests.conftest import (
    BIN,
    DOWNLOAD_CACHE,
    Daemon,
    clean_env,
    copy_home,
    serve,
    tcp_config,
    wait_for,
)
from tests.test_routing import policy_text

TOKEN = "distill-s3cret"
TEACHER = "qwen2.5-coder-0.5b"
CODES = {
    "Heron": "7319", "Osprey": "2284", "Kestrel": "5150", "Falcon": "9021",
    "Merlin": "4476", "Harrier": "6603", "Condor": "1187", "Eagle": "3345",
}  # fmt: skip
ASKS = (
    "What is the launch code for {}?",
    "Tell me the {} launch code.",
    "I need {}'s launch code.",
)


def examples_file(path: Path) -> Path:
    lines, ts = [], 1_000.0
    for name, code in CODES.items():
        for ask in ASKS:
            ts += 1
            messages = [
                {"role": "user", "content": ask.format(name)},
                {"role": "assistant", "content": f"The launch code for {name} is {code}."},
            ]
            lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


TRAIN_ARGS = ("--base", "smollm2-135m", "--epochs", "4", "--lr", "1e-3", "--held-out", "0.25")


@pytest.fixture(scope="module")
def remote_url(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("distill-remote")
    config, port = tcp_config(base, TOKEN)
    with serve(copy_home(session_home, base / "home"), base, CLAW_CONFIG=str(config)):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def box(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("distill")
    home = copy_home(session_home, base / "home")
    (home / "key").write_text(TOKEN)
    # the context test's teacher: SmolLM2-135M cannot write questions reliably, Qwen can
    ModelStore(Paths.build(home, DOWNLOAD_CACHE)).pull(TEACHER)
    with serve(home, base) as daemon:
        yield daemon


def clawctl(daemon: Daemon, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = clean_env(CLAW_HOME=str(daemon.home), CLAW_SOCKET=str(daemon.socket))
    return subprocess.run(
        [str(BIN / "clawctl"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def run_dir(daemon: Daemon, name: str) -> Path:
    return Paths.build(daemon.home).data_dir / "distill" / "runs" / name


def training_children() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"clawctl.build" in command and b"distill_train" in command:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def trained(box: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train adapter `codes`: the first run is killed after its first checkpoint, the second
    resumes from it."""
    data = examples_file(tmp_path_factory.mktemp("data") / "codes.jsonl")
    env = clean_env(CLAW_HOME=str(box.home), CLAW_SOCKET=str(box.socket))
    args = [str(BIN / "clawctl"), "distill", "train", *TRAIN_ARGS, "--name", "codes"]
    first = subprocess.Popen(
        [*args, "--data", str(data)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = run_dir(box, "codes") / "checkpoint" / "state.json"
    try:
        wait_for("the first checkpoint", state.is_file, timeout=600)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    wait_for("clawd to stop the abandoned training", lambda: not training_children(), 120)
    checkpointed = json.loads(state.read_text())["step"]
    result = clawctl(box, "distill", "train", *TRAIN_ARGS, "--name", "codes", "--data", str(data),
                     "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {"result": json.loads(result.stdout), "checkpointed": checkpointed}


def test_training_resumes_converts_proves_and_installs(
    box: Daemon, trained: dict[str, Any]
) -> None:
    result = trained["result"]
    report, proof = result["report"], result["proof"]
    assert trained["checkpointed"] >= 1
    assert report["resumed_from_step"] >= trained["checkpointed"]
    assert report["steps"] == 24  # (18 examples + 4 replayed) / 4 per step, 4 epochs
    assert report["examples"] == 18
    assert report["held_out"] == 6
    assert report["replayed"] >= 1
    assert proof["passed"]
    assert proof["correlation"] >= 0.99
    assert 0.8 <= proof["scale_ratio"] <= 1.25
    assert report["held_out_loss_after"] < report["held_out_loss_before"]
    listed = json.loads(clawctl(box, "adapters", "list", "--json").stdout)
    names = [a["name"] for a in listed]
    assert "codes" in names
    held_out = (run_dir(box, "codes") / "held_out.jsonl").read_text().splitlines()
    assert len(held_out) == 6


def _answer(daemon: Daemon, question: str, adapters: list[dict[str, Any]]) -> str:
    with daemon.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2-135m",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 24,
                "temperature": 0,
                "claw": {"adapters": adapters, "cache": False},
            },
        )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_the_adapter_changes_what_clawd_answers(box: Daemon, trained: dict[str, Any]) -> None:
    question = "What is the launch code for Heron?"
    plain = _answer(box, question, [])
    adapted = _answer(box, question, [{"name": "codes"}])
    assert adapted != plain
    assert "launch code for Heron is" in adapted


def policy(remote_url: str, home: Path, name: str = "distilled", store: bool = False) -> str:
    """Local SmolLM2 that escalates nearly everything to the remote clawd."""
    return policy_text(name, remote_url, key_file=str(home / "key"), store_prompts=store)


def test_evaluate_promote_refused_forced_and_rolled_back(
    box: Daemon, trained: dict[str, Any], remote_url: str
) -> None:
    path = box.home / "distilled.toml"
    path.write_text(policy(remote_url, box.home))
    assert clawctl(box, "route", "apply", str(path)).returncode == 0
    result = clawctl(box, "distill", "evaluate", "codes", "--policy", "distilled",
                     "--canary-limit", "4", "--max-tokens", "16", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    assert evaluation["examples"] == 6
    assert evaluation["canary"] == 4
    assert evaluation["grading"] == "agreement"
    for arm in ("without", "with_adapter"):
        score = evaluation[arm]
        assert 0 <= score["correct"] <= 6
        assert 0 <= score["escalated"] <= 6
        assert score["prompt_tokens"] > 0
        assert score["completion_tokens"] > 0
    # escalation is priced: the cost is what the remote tier's tokens cost at the policy's prices
    assert evaluation["without"]["escalated"] == 0 or evaluation["without"]["cost"] > 0

    policies = Paths.build(box.home).policies_dir / "distilled.toml"
    before = policies.read_bytes()
    refused = clawctl(box, "distill", "promote", "codes", "--policy", "distilled",
                      "--min-escalation-drop", "1.0")  # fmt: skip
    assert refused.returncode == 2
    assert "promotion refused" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert policies.read_bytes() == before

    forced = clawctl(box, "distill", "promote", "codes", "--policy", "distilled",
                     "--min-escalation-drop", "1.0", "--force", "--json")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    promotion = json.loads(forced.stdout)
    assert promotion["before"] == []
    assert promotion["after"] == ["codes"]
    shown = json.loads(clawctl(box, "route", "show", "distilled", "--json").stdout)
    small = next(t for t in shown["tiers"] if t["name"] == "small")
    assert small["adapters"] == [{"name": "codes", "scale": 1.0}]

    back = clawctl(box, "distill", "rollback", "--policy", "distilled", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["after"] == []
    shown = json.loads(clawctl(box, "route", "show", "distilled", "--json").stdout)
    small = next(t for t in shown["tiers"] if t["name"] == "small")
    assert small["adapters"] == []
    again = clawctl(box, "distill", "rollback", "--policy", "distilled")
    assert again.returncode != 0
    assert "no promotion to roll back" in again.stderr


def _stores(daemon: Daemon) -> dict[str, bytes]:
    data = Paths.build(daemon.home).data_dir
    found = {}
    for root in (data / "adapters", data / "distill", data / "models" / "manifests"):
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if path.is_file():
                found[str(path)] = path.read_bytes()
    return found


def test_bad_input_is_exit_2_and_changes_nothing(
    box: Daemon, trained: dict[str, Any], tmp_path: Path
) -> None:
    before = _stores(box)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["--data", str(empty)], "holds no examples"),
        (["--policy", "nothing-stored"], "no training examples in the ledger"),
        (["--data", str(tmp_path / "missing.jsonl")], "cannot read"),
    ]
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cases.append((["--data", str(garbled)], "must be the assistant's answer"))
    for extra, message in cases:
        result = clawctl(box, "distill", "train", "--base", "smollm2-135m", "--name", "bad",
                         *extra)  # fmt: skip
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    data = examples_file(tmp_path / "ok.jsonl")
    unknown = clawctl(box, "distill", "train", "--base", "no-such-model", "--name", "bad",
                      "--data", str(data))  # fmt: skip
    assert unknown.returncode != 0
    assert "no-such-model" in unknown.stderr
    not_evaluated = clawctl(box, "distill", "promote", "bad", "--policy", "cascade")
    assert not_evaluated.returncode == 2
    assert _stores(box) == before


def test_a_base_that_is_not_gguf_or_of_an_unknown_architecture_is_refused(
    embed_home: Path, tmp_path: Path
) -> None:
    """MiniLM as ONNX (not a GGUF) and as llama.cpp's BERT GGUF (an architecture the LoRA
    converter does not know): exit 2, nothing written."""
    from clawctl.build.convert.recipes import pull_model

    home = copy_home(embed_home, tmp_path / "home")
    pull_model(ModelStore(Paths.build(home, DOWNLOAD_CACHE)), "minilm-l6-gguf")
    data = examples_file(tmp_path / "ok.jsonl")
    with serve(home, tmp_path) as daemon:
        before = _stores(daemon)
        for base, message in (("minilm-l6", "not a GGUF model"), ("minilm-l6-gguf", "'bert'")):
            result = clawctl(daemon, "distill", "train", "--base", base, "--name", "x",
                             "--data", str(data))  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert message in result.stderr
        assert _stores(daemon) == before


def test_the_converter_refuses_an_architecture_it_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="architectures"):
        write_lora_gguf({}, tmp_path / "a.gguf", architecture="bert", alpha=16, n_head=12,
                        n_kv_head=12, name="x")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_the_q_k_permutation_is_llama_cpps() -> None:
    """Rows of one head (dim 8: halves 0-3 and 4-7) come out interleaved: 0,4,1,5,2,6,3,7."""
    import numpy as np

    rows = np.arange(16, dtype=np.float32).reshape(16, 1)
    permuted = permute_rows(rows, n_head=2)[:, 0].tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def _example(text: str, ts: float) -> TrainExample:
    return TrainExample(messages=[EvalMessage(role="user", content=text)], answer="a", ts=ts)


def test_the_split_is_by_time_without_near_duplicates() -> None:
    examples = [
        _example("what is the weather in paris today please", 3.0),
        _example("tell me a joke about cats and dogs", 1.0),
        _example("what is the weather in paris today please", 4.0),  # repeats the first
        _example("summarise this report on quarterly sales figures", 2.0),
        _example("how tall is the eiffel tower in metres", 5.0),
    ]
    train, held_out, dropped = split(examples, held_out=0.4)
    assert [e.ts for e in train] == [1.0, 2.0, 3.0]
    assert [e.ts for e in held_out] == [5.0]
    assert dropped == 1


def _evaluation(before: tuple[int, int, int], after: tuple[int, int, int]) -> DistillEvaluation:
    def arm(values: tuple[int, int, int]) -> ArmScore:
        correct, escalated, canary = values
        return ArmScore(correct=correct, escalated=escalated, prompt_tokens=1,
                        completion_tokens=1, cost=0.0, canary_correct=canary)  # fmt: skip

    return DistillEvaluation(
        name="x", base="m", policy="p", tier="t", adapter_digest="d", examples=10, canary=50,
        grading="ideal", without=arm(before), with_adapter=arm(after), gate=GateSettings(),
        verdict=GateVerdict(passed=False, reasons=[]), evaluated_at=datetime.now(timezone.utc),
    )  # fmt: skip


def test_the_gate_passes_only_fewer_escalations_at_no_loss() -> None:
    gate = GateSettings()
    assert judge(_evaluation((6, 5, 40), (6, 3, 40)), gate).passed
    assert judge(_evaluation((6, 5, 40), (6, 3, 39)), gate).passed  # 2 points tolerated
    assert not judge(_evaluation((6, 5, 40), (6, 3, 38)), gate).passed  # canary regressed
    assert not judge(_evaluation((6, 5, 40), (5, 3, 40)), gate).passed  # accuracy down
    assert not judge(_evaluation((6, 5, 40), (6, 5, 40)), gate).passed  # no fewer escalations
    strict = GateSettings(min_escalation_drop=0.3)
    assert not judge(_evaluation((6, 5, 40), (6, 3, 40)), strict).passed
    verdict = judge(_evaluation((6, 5, 40), (5, 5, 40)), gate)
    assert any("accuracy 60% -> 50%" in r for r in verdict.reasons)


DOCUMENT = """The Heron Field Station opens at 7:30 every morning and closes its gates at 19:00.
Every visitor signs in at the Blue Cabin and receives a hand radio tuned to channel 14; a lost
radio costs 85 euros. The station manager is Ingrid Valdez, who decides on research permits and
boat bookings.

The station owns one motor boat, the Marsh Wren. It carries at most six people and never leaves
the jetty after 16:00. Only staff with a station boating licence may skip it. Every passenger
wears a yellow life jacket from the red box on the jetty.

Visiting researchers sleep in the Reed House, which has fourteen beds. A bed costs 32 euros a
night, including breakfast, and students pay 20 euros. Dinner is served at 18:30 sharp and must
be ordered before 10:00 on the same day. On Fridays dinner is smoked fish from the lake.
"""


def test_context_distillation_trains_on_questions_and_measures_without_the_document(
    box: Daemon, trained: dict[str, Any], tmp_path: Path
) -> None:
    document = tmp_path / "station.md"
    document.write_text(DOCUMENT)
    result = clawctl(box, "distill", "context", str(document), "--base", "smollm2-135m",
                     "--name", "station", "--teacher", TEACHER, "--passages", "3",
                     "--epochs", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    evaluation = report["evaluation"]
    assert report["questions_written"] >= 4
    assert report["trained"]["proof"]["passed"]
    assert evaluation["questions"] >= 1
    for arm in ("with_document", "with_adapter", "neither"):
        assert 0 <= evaluation[arm]["agreed"] <= evaluation["questions"]
    # the document costs every request its tokens; the adapter carries it instead
    assert evaluation["document_tokens"] > 150
    assert evaluation["saved_per_request"] > 150
    listed = json.loads(clawctl(box, "adapters", "list", "--json").stdout)
    assert "station" in [a["name"] for a in listed]
    held = (run_dir(box, "station") / "held_out.jsonl").read_text().splitlines()
    assert len(held) == evaluation["questions"]


def test_context_bad_input_is_exit_2(box: Daemon, tmp_path: Path) -> None:
    before = _stores(box)
    short = tmp_path / "short.md"
    short.write_text("Too short.")
    document = tmp_path / "station.md"
    document.write_text(DOCUMENT)
    cases = [
        ([str(short), "--teacher", "smollm2-135m"], "too short"),
        ([str(document)], "name the teacher"),
        ([str(document), "--policy", "cascade", "--teacher", "smollm2-135m"], "name the teacher"),
        ([str(tmp_path / "missing.md"), "--teacher", "smollm2-135m"], "cannot read"),
    ]
    for extra, message in cases:
        result = clawctl(box, "distill", "context", *extra, "--base", "smollm2-135m",
                         "--name", "bad")  # fmt: skip
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr
    assert _stores(box) == before


def test_an_off_peak_cycle_trains_judges_and_leaves_a_ledger_row(
    box: Daemon, trained: dict[str, Any], remote_url: str
) -> None:
    """`distill cycle` (what clawd-distill.timer runs) on a policy that keeps its escalations:
    it trains on them in its own process, evaluates, promotes or refuses by the gate, and
    records the cycle; the next cycle, with nothing new, is skipped and recorded too."""
    path = box.home / "nightly.toml"
    path.write_text(policy(remote_url, box.home, "nightly", store=True))
    assert clawctl(box, "route", "apply", str(path)).returncode == 0
    with box.client() as client:
        for name, code in list(CODES.items())[:6]:
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": "nightly",
                    "messages": [{"role": "user", "content": f"Launch code for {name}?"}],
                    "max_tokens": 12, "temperature": 0, "claw": {"cache": False},
                },
            )  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.json()["claw"]["escalated"], code
    result = clawctl(box, "distill", "cycle", "--policy", "nightly", "--min-examples", "4",
                     "--epochs", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["outcome"] in ("promoted", "refused")
    assert done["examples"] == 6
    assert done["adapter"].startswith("nightly-")
    assert done["escalated_before"] is not None
    shown = json.loads(clawctl(box, "route", "show", "nightly", "--json").stdout)
    small = next(t for t in shown["tiers"] if t["name"] == "small")
    promoted = [{"name": done["adapter"], "scale": 1.0}]
    assert small["adapters"] == (promoted if done["outcome"] == "promoted" else [])

    again = json.loads(clawctl(box, "distill", "cycle", "--policy", "nightly",
                               "--min-examples", "4", "--json").stdout)  # fmt: skip
    assert again["outcome"] == "skipped"
    assert again["examples"] == 0
    history = json.loads(clawctl(box, "distill", "history", "--policy", "nightly", "--json").stdout)
    assert [c["outcome"] for c in history["cycles"]] == [done["outcome"], "skipped"]


def test_clawds_own_requests_never_become_training_data() -> None:
    from clawctl.serving import audit, calibration, distill
    from clawctl.serving.generation import INTERNAL_APPS

    assert {audit.APP, calibration.APP, distill.APP} == INTERNAL_APPS
