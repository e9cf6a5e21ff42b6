"""Speculative decoding with a draft model: the real SmolLM2 drafting for itself at another quant.

SmolLM2 re-quantized to Q4_0 shares the Q4_1 model's vocabulary, so it can draft for it (on this
CPU it is no faster than the target: the pair tests correctness, the benchmark reports speed).
Prompt lookup is switched off where only the draft model's proposals are under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from clawctl.build.quantize_gguf import quantize_file
from clawctl.engines.base import EngineSettings, SamplingParams
from clawctl.engines.decoding import NgramIndex
from clawctl.engines.llama.engine import LlamaEngine
from clawctl.errors import EngineError
from clawctl.paths import Paths
from clawctl.store.models import ModelStore
from clawctl.store.quant_types import quant_by_name
from tests.conftest import copy_home, serve
from tests.test_batching import PROMPTS, TOLERANCE, alone_gaps, chat, run_batched

pytestmark = pytest.mark.integration

CHANGED_TOKEN = 1000


@pytest.fixture(scope="module")
def draft_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("draft") / "smollm2-q4_0.gguf"
    quantize_file(smollm2_gguf, target, quant_by_name("q4_0"), None)
    return target


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path, draft_gguf: Path) -> Iterator[LlamaEngine]:
    settings = EngineSettings(
        smollm2_gguf, 2048, 256, 2, parallel=4, draft_max=8, draft_path=draft_gguf
    )
    loaded = LlamaEngine(settings)
    yield loaded
    loaded.close()


def test_draft_model_tokens_are_the_models_own(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(NgramIndex, "draft", lambda self, limit: [])  # the draft model only
    engine.prefill([], reuse=False)
    emitted, finished = run_batched(engine, monkeypatch)
    for seq, prompt in enumerate(PROMPTS):
        gaps = alone_gaps(engine, chat(*prompt), emitted[seq])
        assert max(gaps) <= TOLERANCE, (seq, gaps)
    drafted = sum(f.drafted for f in finished.values())
    accepted = sum(f.accepted for f in finished.values())
    assert drafted > 0
    assert 0 < accepted <= drafted
    assert accepted >= drafted // 2  # a draft of the same weights mostly holds
    drafter = engine._drafter
    assert drafter is not None
    assert set(drafter._held) <= {0}  # ended sequences' cells were released


def test_sampled_requests_are_not_drafted(engine: LlamaEngine) -> None:
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3)
    engine.open(engine.prepare(chat(*PROMPTS[1])), params, lambda: False)
    finished = []
    while engine.active:
        finished += [event for _, event in engine.step() if hasattr(event, "drafted")]
    assert finished[0].drafted == 0


def _with_changed_token(source: Path, target: Path) -> Path:
    """A GGUF with `source`'s metadata (no tensors) and one token's text changed."""
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(target), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "tokenizer.ggml.tokens":
            value[CHANGED_TOKEN] = "not-the-same-token"
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_a_draft_with_another_vocabulary_is_refused(smollm2_gguf: Path, tmp_path: Path) -> None:
    other = _with_changed_token(smollm2_gguf, tmp_path / "other-vocab.gguf")
    settings = EngineSettings(smollm2_gguf, 512, 64, 2, draft_max=8, draft_path=other)
    with pytest.raises(EngineError) as caught:
        LlamaEngine(settings)
    message = caught.value.message
    assert "\n" not in message
    assert "does not share this model's vocabulary" in message
    assert f"token {CHANGED_TOKEN} differs" in message


def test_daemon_drafts_with_the_configured_model(
    session_home: Path, smollm2_gguf: Path, draft_gguf: Path, tmp_path: Path
) -> None:
    home = copy_home(session_home, tmp_path / "home")
    store = ModelStore(Paths.build(home))
    store.add(draft_gguf, name="smollm2-draft")
    store.add(smollm2_gguf, name="smollm2-misconfigured")
    config = tmp_path / "clawd.toml"
    config.write_text(
        '[drafts]\n"smollm2-135m" = "smollm2-draft"\n"smollm2-misconfigured" = "not-installed"\n'
    )
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 48,
        "temperature": 0,
        "claw": {"cache": False},
    }
    with serve(home, tmp_path, CLAW_CONFIG=str(config)) as daemon, daemon.client() as client:
        claw = client.post("/v1/chat/completions", json=body).json()["claw"]
        assert claw["draft_tokens"] > 0
        assert 0 < claw["draft_accepted"] <= claw["draft_tokens"]
        off = client.post(
            "/v1/chat/completions", json={**body, "claw": {"speculative": False, "cache": False}}
        ).json()["claw"]
        assert off["draft_tokens"] == 0
        loaded = client.get("/health").json()["loaded"]
        assert [(m["name"], m["draft"]) for m in loaded] == [("smollm2-135m", "smollm2-draft")]
        broken = client.post(
            "/v1/chat/completions", json={**body, "model": "smollm2-misconfigured"}
        )
        assert broken.status_code == 500
        message = broken.json()["error"]["message"]
        assert "draft model for 'smollm2-misconfigured'" in message
        assert "'not-installed' is not installed" in message
