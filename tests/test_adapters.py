"""LoRA adapters built with the `gguf` package for SmolLM2's real tensor shapes: verified
installs, per-request application in a real clawd, adapter-aware snapshots, hot install/remove."""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from tests.conftest import Daemon, add_serial_profile, run_cli, run_daemon

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"


def make_lora(
    base: Path,
    out: Path,
    *,
    b_scale: float = 0.0,
    arch: str = "llama",
    rank: int = 8,
    transpose_a: bool = False,
    extra_target: str | None = None,
    seed: int = 0,
) -> Path:
    """A LoRA GGUF on the q/v projections of every block, as convert_lora_to_gguf.py writes."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(out, arch=arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    targets = [
        (t.name, [int(d) for d in t.shape])
        for t in GGUFReader(base).tensors
        if t.name.endswith(("attn_q.weight", "attn_v.weight"))
    ]
    if extra_target:
        targets.append((extra_target, [576, 576]))
    for name, (n_in, n_out) in targets:
        a = (rng.standard_normal((rank, n_in)) * 0.1).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * b_scale).astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", a.T.copy() if transpose_a else a)
        writer.add_tensor(f"{name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def loras(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "zero": make_lora(smollm2_gguf, root / "zero.gguf"),
        "strong": make_lora(smollm2_gguf, root / "strong.gguf", b_scale=0.5, seed=1),
        "arch": make_lora(smollm2_gguf, root / "arch.gguf", arch="qwen2"),
        "shape": make_lora(smollm2_gguf, root / "shape.gguf", transpose_a=True),
        "target": make_lora(
            smollm2_gguf, root / "target.gguf", extra_target="blk.99.attn_q.weight"
        ),
    }


def _env(home: Path, daemon: Daemon | None = None) -> dict[str, str]:
    env = dict(os.environ, CLAW_HOME=str(home))
    if daemon is not None:
        env["CLAW_SOCKET"] = str(daemon.socket)
    return env


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("arch", "architecture 'qwen2'"), ("shape", "do not fit"), ("target", "does not exist")],
)
def test_bad_adapters_are_rejected_and_store_unchanged(
    fresh_home: Path, loras: dict[str, Path], kind: str, fragment: str
) -> None:
    env = _env(fresh_home)
    done = run_cli("adapters", "install", str(loras[kind]), "--base", MODEL, env=env)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(run_cli("adapters", "list", "--json", env=env).stdout) == []
    blobs = fresh_home / "data" / "models" / "blobs"
    assert [p.name for p in blobs.iterdir() if p.name.startswith(".")] == []


def test_a_model_file_is_not_an_adapter(fresh_home: Path, smollm2_gguf: Path) -> None:
    done = run_cli("adapters", "install", str(smollm2_gguf), "--base", MODEL, env=_env(fresh_home))
    assert done.returncode == 2
    assert "not an adapter" in done.stderr


def test_install_list_show_verify_rm_and_sha_pinning(
    fresh_home: Path, loras: dict[str, Path]
) -> None:
    env = _env(fresh_home)
    wrong = run_cli(
        "adapters", "install", str(loras["zero"]), "--base", MODEL, "--sha256", "0" * 64, env=env
    )
    assert wrong.returncode == 1
    installed = run_cli(
        "adapters",
        "install",
        str(loras["zero"]),
        "--base",
        MODEL,
        "--name",
        "zero",
        "--json",
        env=env,
    )
    assert installed.returncode == 0, installed.stderr
    manifest = json.loads(installed.stdout)
    assert manifest["rank"] == 8
    assert len(manifest["targets"]) == 60
    assert [
        m["name"] for m in json.loads(run_cli("adapters", "list", "--json", env=env).stdout)
    ] == ["zero"]
    assert (
        json.loads(run_cli("adapters", "show", "zero", "--base", MODEL, "--json", env=env).stdout)[
            "alpha"
        ]
        == 8.0
    )
    assert run_cli("adapters", "verify", env=env).returncode == 0
    assert run_cli("adapters", "rm", "zero", "--base", MODEL, env=env).returncode == 0
    assert run_cli("adapters", "show", "zero", "--base", MODEL, env=env).returncode == 2
    missing_base = run_cli("adapters", "install", str(loras["zero"]), "--base", "nope", env=env)
    assert missing_base.returncode == 2


@pytest.fixture
def lora_daemon(
    fresh_home: Path, loras: dict[str, Path], short_dir: Path, tmp_path: Path
) -> Iterator[Daemon]:
    env = _env(fresh_home)
    for name in ("zero", "strong"):
        done = run_cli(
            "adapters", "install", str(loras[name]), "--base", MODEL, "--name", name, env=env
        )
        assert done.returncode == 0, done.stderr
    config = tmp_path / "clawd.toml"
    config.write_text("[snapshots]\npool = false\n")
    # One generation at a time: the concurrency test compares outputs token for token.
    profile = add_serial_profile(fresh_home)
    with run_daemon(
        fresh_home, short_dir / "a.sock", tmp_path, CLAW_CONFIG=str(config), CLAW_PROFILE=profile
    ) as d:
        yield d


def complete(daemon: Daemon, prompt: str = PROMPT, **claw: object) -> dict:  # type: ignore[type-arg]
    return daemon.complete(prompt, **claw)


def text(reply: dict) -> str:  # type: ignore[type-arg]
    return str(reply["choices"][0]["text"])


@pytest.mark.integration
def test_adapters_per_request_without_reloading(lora_daemon: Daemon) -> None:
    base = text(complete(lora_daemon))
    zero = complete(lora_daemon, adapters=[{"name": "zero"}])
    assert text(zero) == base  # B = 0: the adapter adds nothing
    assert zero["claw"]["adapters"] == [{"name": "zero", "scale": 1.0}]
    strong = text(complete(lora_daemon, adapters=[{"name": "strong"}]))
    assert strong != base
    assert text(complete(lora_daemon, adapters=[{"name": "strong"}])) == strong  # deterministic
    assert text(complete(lora_daemon)) == base  # and back, on the same loaded model
    assert "loaded in" in lora_daemon.log_text()
    assert lora_daemon.log_text().count("loaded in") == 1  # the base model never reloaded
    with lora_daemon.client() as client:
        unknown = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "claw": {"adapters": [{"name": "nope"}]}},
        )
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]["message"]


@pytest.mark.integration
def test_concurrent_requests_with_and_without_adapter(lora_daemon: Daemon) -> None:
    # Prompts share no prefix: reusing a held prefix prefills the rest as a smaller batch, which
    # rounds differently, and the strong adapter's chaotic logits would flip on that.
    prompts = [PROMPT, "Paris is a city where", "My favourite colour is"]

    def run(key: tuple[str, str]) -> str:
        prompt, adapter = key
        return text(complete(lora_daemon, prompt, adapters=[{"name": adapter}] if adapter else []))

    keys = [(p, a) for p in prompts for a in ("", "strong")]
    expected = {key: run(key) for key in keys}  # one at a time
    assert (
        len({expected[(p, "")] for p in prompts} & {expected[(p, "strong")] for p in prompts}) == 0
    )
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(run, keys * 2))
    assert got == [expected[key] for key in keys * 2]


@pytest.mark.integration
def test_snapshots_are_keyed_by_adapter_set(lora_daemon: Daemon) -> None:
    complete(lora_daemon, PROMPT, adapters=[{"name": "strong"}], snapshot={"save": "with-strong"})
    with lora_daemon.client() as client:
        refused = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "claw": {"snapshot": {"load": "with-strong"}}},
        )
        half = client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": PROMPT,
                "claw": {
                    "snapshot": {"load": "with-strong"},
                    "adapters": [{"name": "strong", "scale": 0.5}],
                },
            },
        )
    assert refused.status_code == 400
    assert "adapters" in refused.json()["error"]["message"]
    assert half.status_code == 400
    ok = complete(
        lora_daemon, PROMPT, adapters=[{"name": "strong"}], snapshot={"load": "with-strong"}
    )
    assert ok["claw"]["prefix_source"] == "snapshot"


@pytest.mark.integration
def test_hot_install_and_remove(lora_daemon: Daemon, loras: dict[str, Path]) -> None:
    env = _env(lora_daemon.home, lora_daemon)
    base = text(complete(lora_daemon))
    installed = run_cli(
        "adapters", "install", str(loras["strong"]), "--base", MODEL, "--name", "late", env=env
    )
    assert installed.returncode == 0, installed.stderr
    assert text(complete(lora_daemon, adapters=[{"name": "late"}])) != base
    assert run_cli("adapters", "rm", "late", "--base", MODEL, env=env).returncode == 0
    with lora_daemon.client() as client:
        gone = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "claw": {"adapters": [{"name": "late"}]}},
        )
    assert gone.status_code == 404
    assert text(complete(lora_daemon, adapters=[{"name": "strong"}])) != base


@pytest.mark.integration
def test_policy_assigns_adapters_per_tier_and_rule(lora_daemon: Daemon) -> None:
    policy = lora_daemon.home / "tuned.toml"
    policy.write_text(
        f"""name = "tuned"
start = "local"

[[tiers]]
name = "local"
kind = "local"
model = "{MODEL}"
adapters = [{{ name = "strong", scale = 1.0 }}]

[[rules]]
name = "plain app"
app = "plain"
adapters = []
"""
    )
    applied = run_cli("route", "apply", str(policy), env=_env(lora_daemon.home))
    assert applied.returncode == 0, applied.stderr
    strong = text(complete(lora_daemon, adapters=[{"name": "strong"}]))
    base = text(complete(lora_daemon))

    def routed(**claw: object) -> dict:  # type: ignore[type-arg]
        with lora_daemon.client() as client:
            body = {"model": "tuned", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
            response = client.post("/v1/completions", json={**body, "claw": claw})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    by_tier = routed()
    assert by_tier["claw"]["adapters"] == [{"name": "strong", "scale": 1.0}]
    assert text(by_tier) == strong
    by_rule = routed(app="plain")
    assert by_rule["claw"]["adapters"] == []
    assert text(by_rule) == base
    by_request = routed(adapters=[{"name": "zero"}])  # the request's own choice wins
    assert by_request["claw"]["adapters"] == [{"name": "zero", "scale": 1.0}]
    assert text(by_request) == base
