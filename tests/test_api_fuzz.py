"""Fuzz the HTTP API against its own OpenAPI document (schemathesis + hypothesis): generated
valid and invalid bodies, paths and parameters for every operation must never get a 5xx.

A real clawd on 127.0.0.1 with a bearer token (schemathesis speaks TCP) and a small context, so
the valid requests it generates (any `max_tokens`) stay quick; bounded in examples per operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import copy_home, derived_profile, serve, tcp_config

TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def fuzz_target(
    session_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    base = tmp_path_factory.mktemp("fuzz")
    home = copy_home(session_home, base / "home")
    profile = derived_profile(home, "x86-fuzz", n_ctx=256)
    config, port = tcp_config(base, TOKEN)
    with serve(home, base, CLAW_CONFIG=str(config), CLAW_PROFILE=profile):
        yield f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.integration
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_the_api_fail_with_5xx(
    fuzz_target: tuple[str, dict[str, str]], mode: GenerationMode
) -> None:
    """Every operation, with bodies that match the schema (positive) and that break it
    (negative): a 4xx in the face's error shape at worst."""
    base_url, headers = fuzz_target
    document = httpx.get(f"{base_url}/openapi.json", headers=headers, timeout=30).json()
    operations = [
        result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()
    ]
    assert {op.path for op in operations} >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/api/chat",
        "/api/generate",
    }
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate],  # no shrinking: a failure reports its own input
            database=None,
        )
        def call(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=120)
            assert response.status_code < 500, (
                case.method,
                case.path,
                case.body,
                response.text[:500],
            )
            if response.status_code >= 400:
                assert "error" in response.json()  # the face's error shape, never a traceback

        try:
            call()
        except Unsatisfiable:
            # negative mode: an operation with no body whose only input (if any) is a
            # free-form name in the path has nothing to break
            assert mode == GenerationMode.NEGATIVE
            spec = document["paths"][operation.path][operation.method.lower()]
            assert "requestBody" not in spec, operation.label
            assert all(p["in"] == "path" for p in spec.get("parameters", [])), operation.label
