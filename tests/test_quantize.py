"""`clawctl models quantize` with llama.cpp's real quantizer on the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from clawctl.config import load_paths
from clawctl.engines.base import (
    EngineSettings,
    Finished,
    Prompt,
    SamplingParams,
    TokenEvent,
    generate,
)
from clawctl.engines.llama.engine import LlamaEngine
from clawctl.store.models import ModelStore
from tests.conftest import run_cli


@pytest.fixture
def store(smollm2_gguf: Path) -> ModelStore:
    store = ModelStore(load_paths())
    store.add(smollm2_gguf, name="smollm2-135m")
    return store


def _generate(path: Path, prompt: str) -> tuple[str, Finished]:
    engine = LlamaEngine(EngineSettings(path, n_ctx=512, n_batch=64, n_threads=2))
    try:
        events = list(
            generate(
                engine,
                engine.prepare(Prompt(text=prompt)),
                SamplingParams(max_tokens=12, temperature=0),
                lambda: False,
            )
        )
    finally:
        engine.close()
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    done = events[-1]
    assert isinstance(done, Finished)
    return text, done


def test_quantize_to_q2_0_makes_a_working_int2_model(store: ModelStore) -> None:
    done = run_cli("models", "quantize", "smollm2-135m", "--to", "q2_0", "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["name"] == "smollm2-135m-q2_0"
    assert manifest["gguf"]["quant"] == "Q2_0"
    assert manifest["parent"] == "smollm2-135m"
    assert manifest["size"] < 0.7 * store.get("smollm2-135m").size
    assert all(r.ok for r in store.verify())
    text, finished = _generate(store.model_file("smollm2-135m-q2_0"), "The capital of France is")
    assert finished.completion_tokens > 0
    assert text.strip()
    # What it kept of its source, measured on the shipped probe text, and shown by `models show`.
    kept = manifest["quality"]
    assert kept["metric"] == "greedy_agreement"
    assert kept["value"] < 0.5  # 2-bit SmolLM2 says something else at most positions
    assert kept["tokens"] > 200
    shown = run_cli("models", "show", "smollm2-135m-q2_0")
    assert "quality kept" in shown.stdout
    # A policy that sets a floor refuses a tier below it, with the measured number.
    policy = store.paths.data_dir / "floor.toml"
    policy.write_text(
        'name = "floor"\nstart = "int2"\n\n[[tiers]]\nname = "int2"\nkind = "local"\n'
        'model = "smollm2-135m-q2_0"\nmin_quality = 0.95\n'
    )
    refused = run_cli("route", "apply", str(policy))
    assert refused.returncode == 2
    assert "below the tier's min_quality 95%" in refused.stderr


def test_quantize_refuses_existing_name_and_unknown_type(store: ModelStore) -> None:
    made = run_cli("models", "quantize", "smollm2-135m", "--to", "q4_0", "--name", "q", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["quality"]["value"] > 0.6  # 4 bits keep most greedy tokens
    again = run_cli("models", "quantize", "smollm2-135m", "--to", "q4_0", "--name", "q")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    unknown = run_cli("models", "quantize", "smollm2-135m", "--to", "q3_banana")
    assert unknown.returncode == 2
    assert "INT2" in unknown.stderr


def _synthetic_imatrix(model: Path, out: Path) -> Path:
    """An importance matrix in llama-imatrix's GGUF layout: uniform importance per column."""
    writer = GGUFWriter(out, arch="imatrix")
    writer.add_string("general.type", "imatrix")
    for tensor in GGUFReader(model).tensors:
        if len(tensor.shape) == 2 and tensor.name.endswith(".weight"):
            columns = int(tensor.shape[0])
            writer.add_tensor(f"{tensor.name}.in_sum2", np.full((1, columns), 4.0, np.float32))
            writer.add_tensor(f"{tensor.name}.counts", np.full((1, 1), 2.0, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_imatrix_types_need_an_imatrix(store: ModelStore, tmp_path: Path) -> None:
    refused = run_cli("models", "quantize", "smollm2-135m", "--to", "iq2_xxs")
    assert refused.returncode == 2
    assert "--imatrix" in refused.stderr
    assert [m.name for m in store.installed()] == ["smollm2-135m"]
    imatrix = _synthetic_imatrix(store.model_file("smollm2-135m"), tmp_path / "imatrix.gguf")
    done = run_cli(
        "models", "quantize", "smollm2-135m", "--to", "iq2_xxs", "--imatrix", str(imatrix), "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gguf"]["quant"] == "IQ2_XXS"
    not_imatrix = tmp_path / "junk.gguf"
    not_imatrix.write_bytes(b"junk")
    bad = run_cli(
        "models", "quantize", "smollm2-135m", "--to", "iq2_xs", "--imatrix", str(not_imatrix)
    )
    assert bad.returncode == 2
    assert "imatrix" in bad.stderr
