"""The typed client for clawd: httpx over the Unix socket (or TCP with a token).

The transport is injectable (httpx's `HTTPTransport(uds=…)`, `MockTransport`, an ASGI transport),
which is how the CLI talks to the daemon and how tests exercise the client. Error envelopes from
the daemon become the same `ClawError` subclasses the daemon raised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from clawctl.config import ClientConfig
from clawctl.errors import BadInput, ClawError, DaemonUnavailable, error_class_for
from clawctl.fsutil import atomic_writer
from clawctl.schemas.adapters import (
    AdapterInstallRequest,
    AdapterListing,
    AdapterManifest,
    AdapterVerifyReport,
)
from clawctl.schemas.admin import Health
from clawctl.schemas.distill import (
    DistillContextRequest,
    DistillContextResult,
    DistillCycle,
    DistillCycleListing,
    DistillEvaluateRequest,
    DistillEvaluation,
    DistillPrepared,
    DistillPrepareRequest,
    DistillPromoteRequest,
    DistillPromotion,
    DistillRollbackRequest,
    DistillTrainRequest,
    DistillTrainResult,
)
from clawctl.schemas.fleet import (
    FleetGcRequest,
    FleetGcResult,
    FleetPullRequest,
    FleetPushRequest,
    FleetPushResult,
    FleetStatus,
    FleetSyncResult,
)
from clawctl.schemas.jobs import JOB_LINE
from clawctl.schemas.ledger import AuditListing, ExportFormat, GroupBy, LedgerSummary
from clawctl.schemas.models import (
    AddRequest,
    ConvertRequest,
    ModelListing,
    ModelManifest,
    PullRequest,
    PullResult,
    QuantizeRequest,
    QuantizeResult,
    VerifyReport,
    VerifyRequest,
)
from clawctl.schemas.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ClawInfo,
    Completion,
    ModelList,
    Usage,
)
from clawctl.schemas.policy import (
    CalibrateRequest,
    CalibrationResult,
    ExplainRequest,
    PolicyDetail,
    PolicyListing,
    PolicyText,
    RouteExplanation,
)
from clawctl.schemas.snapshots import (
    PruneRequest,
    PruneResult,
    RemovedSnapshot,
    SnapshotDetail,
    SnapshotInfo,
    SnapshotListing,
    SnapshotVerifyReport,
)

Model = TypeVar("Model", bound=BaseModel)


class ProgressView(Protocol):
    """Where the client shows a long operation's progress and messages (the CLI: Rich)."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...

    def status(self, text: str) -> None: ...

    def message(self, text: str, level: str) -> None: ...


def follow_job(lines: Iterable[str], response: type[Model], progress: ProgressView) -> Model | None:
    """Show a job's `JobLine`s (NDJSON, from clawd or from a build subprocess) on `progress`
    until its result; an error line is raised as the error it names; None when the lines end
    without either."""
    for raw in lines:
        if not raw.strip():
            continue
        line = JOB_LINE.validate_json(raw)
        if line.type == "start":
            progress.start(line.description, line.total)
        elif line.type == "advance":
            progress.advance(line.amount)
        elif line.type == "status":
            progress.status(line.text)
        elif line.type == "message":
            progress.message(line.text, line.level)
        elif line.type == "error":
            raise error_class_for(line.code, line.status)(line.message)
        else:
            return response.model_validate(line.result)
    return None


@dataclass(frozen=True)
class StreamEnd:
    """What the stream said after the text: why it ended and the daemon's `claw` report."""

    finish_reason: str | None
    claw: ClawInfo | None
    usage: Usage | None


class ClawClient:
    def __init__(
        self,
        config: ClientConfig,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        if config.url:
            base_url = config.url.rstrip("/")
            self.where = config.url
        else:
            transport = transport or httpx.HTTPTransport(uds=str(config.socket_path))
            base_url = "http://clawd"
            self.where = str(config.socket_path)
        self._http = httpx.Client(
            base_url=base_url,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ClawClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _unavailable(self) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"clawd is not reachable at {self.where}; start it with 'clawctl serve' "
            "(or 'make run', or 'systemctl start clawd')"
        )

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            message, code, param = error["message"], error.get("code"), error.get("param")
        except (ValueError, KeyError, TypeError):
            message, code, param = response.text or response.reason_phrase, None, None
        raise error_class_for(code, response.status_code)(message, param=param)

    def _get(self, path: str) -> Any:
        try:
            response = self._http.get(path)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError):
            raise self._unavailable() from None
        self._raise_for(response)
        return response.json()

    def _call(
        self,
        method: str,
        path: str,
        response: type[Model],
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
    ) -> Model:
        """One admin request with a typed body and a typed answer."""
        try:
            answer = self._http.request(
                method,
                path,
                content=None if body is None else body.model_dump_json(),
                headers={"Content-Type": "application/json"} if body is not None else None,
                params={k: v for k, v in (params or {}).items() if v is not None},
            )
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the connection: {exc}") from None
        self._raise_for(answer)
        return response.model_validate_json(answer.content)

    def _job(
        self,
        path: str,
        response: type[Model],
        progress: ProgressView,
        *,
        body: BaseModel | None = None,
        content: Iterator[bytes] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Model:
        """A long admin operation: POST, then read its NDJSON `JobLine`s until the result."""
        if body is not None:
            content = iter([body.model_dump_json().encode()])
        try:
            with self._http.stream(
                "POST",
                path,
                content=content,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers={"Content-Type": "application/json"} if body is not None else None,
            ) as answer:
                if answer.status_code >= 400:
                    answer.read()
                    self._raise_for(answer)
                found = follow_job(answer.iter_lines(), response, progress)
                if found is not None:
                    return found
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the stream early: {exc}") from None
        raise ClawError(f"clawd ended {path} without a result; see its log")

    def _download(self, path: str, params: dict[str, Any] | None = None) -> Iterator[bytes]:
        """A streamed GET (snapshot export, ledger export): the body in chunks."""
        try:
            with self._http.stream(
                "GET", path, params={k: v for k, v in (params or {}).items() if v is not None}
            ) as answer:
                if answer.status_code >= 400:
                    answer.read()
                    self._raise_for(answer)
                yield from answer.iter_bytes()
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the stream early: {exc}") from None

    # --- models (admin) ---

    @staticmethod
    def _model_path(name: str) -> str:
        """`/admin/models/NAME` with NAME as one path segment: percent-encoded, and a name of
        only dots encoded too (httpx would resolve '..' away), so clawd sees and refuses it."""
        segment = quote(name, safe="")
        if segment and not segment.strip("."):
            segment = segment.replace(".", "%2E")
        return f"/admin/models/{segment}"

    def list_models(self) -> ModelListing:
        return self._call("GET", "/admin/models", ModelListing)

    def show_model(self, name: str) -> ModelManifest:
        return self._call("GET", self._model_path(name), ModelManifest)

    def remove_model(self, name: str) -> ModelManifest:
        """Remove a model; returns the manifest it had."""
        return self._call("DELETE", self._model_path(name), ModelManifest)

    def verify_models(self, names: list[str]) -> VerifyReport:
        """Re-hash the named models' blobs (all models when `names` is empty)."""
        return self._call(
            "POST", "/admin/models/verify", VerifyReport, body=VerifyRequest(names=names)
        )

    def pull_model(self, request: PullRequest, progress: ProgressView) -> PullResult:
        return self._job("/admin/models/pull", PullResult, progress, body=request)

    def add_model(self, request: AddRequest, progress: ProgressView) -> ModelManifest:
        """Import a GGUF file by a path clawd's own user can read (no upload)."""
        return self._job("/admin/models/add", ModelManifest, progress, body=request)

    def upload_model(
        self, path: Path, name: str | None, progress: ProgressView, chunk: int = 1 << 20
    ) -> ModelManifest:
        """Send a local GGUF file to clawd as the request body, in chunks (never whole in
        memory), showing the upload's progress; clawd then checks, hashes and adopts it."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BadInput(f"cannot read {path}: {exc.strerror}", param="path") from None

        def body() -> Iterator[bytes]:
            progress.start(f"uploading {path.name}", size)
            with path.open("rb") as source:
                while data := source.read(chunk):
                    yield data
                    progress.advance(len(data))

        params = {"name": name, "filename": path.name}
        return self._job(
            "/admin/models/upload", ModelManifest, progress, content=body(), params=params
        )

    def quantize_model(self, request: QuantizeRequest, progress: ProgressView) -> QuantizeResult:
        return self._job("/admin/models/quantize", QuantizeResult, progress, body=request)

    def convert_model(self, request: ConvertRequest, progress: ProgressView) -> ModelManifest:
        return self._job("/admin/models/convert", ModelManifest, progress, body=request)

    # --- adapters (admin) ---

    @staticmethod
    def _segment(name: str) -> str:
        """A name as one URL path segment: percent-encoded, and a name of only dots encoded
        too (httpx would resolve '..' away), so clawd sees it as given and refuses it."""
        segment = quote(name, safe="")
        return segment.replace(".", "%2E") if segment and not segment.strip(".") else segment

    @staticmethod
    def _file_body(
        path: Path, description: str, progress: ProgressView, chunk: int = 1 << 20
    ) -> Iterator[bytes]:
        """A local file as a streamed request body (never whole in memory), with progress."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BadInput(f"cannot read {path}: {exc.strerror}", param="path") from None

        def body() -> Iterator[bytes]:
            progress.start(description, size)
            with path.open("rb") as source:
                while data := source.read(chunk):
                    yield data
                    progress.advance(len(data))

        return body()

    def _adapter_path(self, base: str, name: str) -> str:
        return f"/admin/adapters/{self._segment(base)}/{self._segment(name)}"

    def list_adapters(self, base: str | None = None) -> AdapterListing:
        return self._call("GET", "/admin/adapters", AdapterListing, params={"base": base})

    def show_adapter(self, base: str, name: str) -> AdapterManifest:
        return self._call("GET", self._adapter_path(base, name), AdapterManifest)

    def install_adapter(
        self, request: AdapterInstallRequest, progress: ProgressView
    ) -> AdapterManifest:
        """Have clawd fetch an adapter from a URL, verify it against its base and install it."""
        return self._job("/admin/adapters/install", AdapterManifest, progress, body=request)

    def upload_adapter(
        self,
        path: Path,
        *,
        base: str,
        name: str | None,
        sha256: str | None,
        progress: ProgressView,
    ) -> AdapterManifest:
        """Send a local adapter file to clawd, which verifies it against its base and installs
        it (the name defaults to one made from the file's name)."""
        body = self._file_body(path, f"uploading {path.name}", progress)
        params = {"base": base, "name": name, "sha256": sha256, "filename": path.name}
        return self._job(
            "/admin/adapters/upload", AdapterManifest, progress, content=body, params=params
        )

    def remove_adapter(self, base: str, name: str) -> AdapterManifest:
        """Remove an adapter; returns the manifest it had."""
        return self._call("DELETE", self._adapter_path(base, name), AdapterManifest)

    def verify_adapters(self) -> AdapterVerifyReport:
        return self._call("POST", "/admin/adapters/verify", AdapterVerifyReport)

    # --- the fleet (admin) ---

    def fleet_status(self) -> FleetStatus:
        return self._call("GET", "/admin/fleet", FleetStatus)

    def fleet_push(self, request: FleetPushRequest) -> FleetPushResult:
        return self._call("POST", "/admin/fleet/push", FleetPushResult, body=request)

    def fleet_pull(self, request: FleetPullRequest) -> SnapshotInfo:
        return self._call("POST", "/admin/fleet/pull", SnapshotInfo, body=request)

    def fleet_sync(self) -> FleetSyncResult:
        return self._call("POST", "/admin/fleet/sync", FleetSyncResult)

    def fleet_gc(self, request: FleetGcRequest) -> FleetGcResult:
        return self._call("POST", "/admin/fleet/gc", FleetGcResult, body=request)

    # --- snapshots (admin) ---

    def _snapshot_path(self, name: str) -> str:
        return f"/admin/snapshots/{self._segment(name)}"

    def list_snapshots(self) -> SnapshotListing:
        return self._call("GET", "/admin/snapshots", SnapshotListing)

    def show_snapshot(self, name: str) -> SnapshotDetail:
        return self._call("GET", self._snapshot_path(name), SnapshotDetail)

    def remove_snapshot(self, name: str) -> RemovedSnapshot:
        return self._call("DELETE", self._snapshot_path(name), RemovedSnapshot)

    def prune_snapshots(self, request: PruneRequest) -> PruneResult:
        return self._call("POST", "/admin/snapshots/prune", PruneResult, body=request)

    def verify_snapshots(self) -> SnapshotVerifyReport:
        return self._call("POST", "/admin/snapshots/verify", SnapshotVerifyReport)

    def export_snapshot(self, name: str, dest: Path, progress: ProgressView) -> SnapshotDetail:
        """Download a snapshot (clawd verifies it first) into `dest` atomically: a temp file
        beside it, fsynced, renamed; an interrupted download leaves `dest` as it was."""
        detail = self.show_snapshot(name)
        progress.start(f"exporting {name}", detail.stored_size)
        with atomic_writer(dest, mode=0o600) as out:
            for chunk in self._download(f"{self._snapshot_path(name)}/export"):
                out.write(chunk)
                progress.advance(len(chunk))
        return detail

    def import_snapshot(
        self, source: Path, name: str | None, progress: ProgressView
    ) -> SnapshotInfo:
        """Send a snapshot file to clawd, which verifies all of it and adds it as a named
        snapshot (`name`, default: the name in the file)."""
        body = self._file_body(source, f"uploading {source.name}", progress)
        return self._job(
            "/admin/snapshots/import", SnapshotInfo, progress, content=body, params={"name": name}
        )

    # --- ledger and distill (admin) ---

    def ledger_summary(
        self, by: GroupBy, since: float | None = None, fleet: bool = False
    ) -> LedgerSummary:
        params = {"by": by, "since": since, "fleet": fleet}
        return self._call("GET", "/admin/ledger/summary", LedgerSummary, params=params)

    def ledger_audits(self, policy: str, since: float | None = None) -> AuditListing:
        params = {"policy": policy, "since": since}
        return self._call("GET", "/admin/ledger/audits", AuditListing, params=params)

    def ledger_export(self, fmt: ExportFormat, since: float | None = None) -> Iterator[bytes]:
        return self._download("/admin/ledger/export", {"format": fmt, "since": since})

    def distill_export(
        self, since: float | None = None, policy: str | None = None
    ) -> Iterator[bytes]:
        """Chat-format JSONL of escalated requests (policies with `store_prompts = true`)."""
        return self._download("/admin/distill/export", {"since": since, "policy": policy})

    def distill_train(
        self, request: DistillTrainRequest, progress: ProgressView
    ) -> DistillTrainResult:
        """Train a LoRA in clawd's build subprocess, prove its GGUF and install it."""
        return self._job("/admin/distill/train", DistillTrainResult, progress, body=request)

    def distill_context(
        self, request: DistillContextRequest, progress: ProgressView
    ) -> DistillContextResult:
        """A document into an adapter, trained and evaluated in clawd."""
        return self._job("/admin/distill/context", DistillContextResult, progress, body=request)

    def distill_evaluate(
        self, request: DistillEvaluateRequest, progress: ProgressView
    ) -> DistillEvaluation:
        return self._job("/admin/distill/evaluate", DistillEvaluation, progress, body=request)

    def distill_prepare(self, request: DistillPrepareRequest) -> DistillPrepared:
        return self._call("POST", "/admin/distill/prepare", DistillPrepared, body=request)

    def distill_record(self, cycle: DistillCycle) -> DistillCycle:
        return self._call("POST", "/admin/distill/cycles", DistillCycle, body=cycle)

    def distill_cycles(self, policy: str | None = None) -> DistillCycleListing:
        params = {"policy": policy}
        return self._call("GET", "/admin/distill/cycles", DistillCycleListing, params=params)

    def distill_promote(self, request: DistillPromoteRequest) -> DistillPromotion:
        return self._call("POST", "/admin/distill/promote", DistillPromotion, body=request)

    def distill_rollback(self, request: DistillRollbackRequest) -> DistillPromotion:
        return self._call("POST", "/admin/distill/rollback", DistillPromotion, body=request)

    # --- routing policies (admin) ---

    def _policy_path(self, name: str) -> str:
        return f"/admin/policies/{self._segment(name)}"

    def list_policies(self) -> PolicyListing:
        return self._call("GET", "/admin/policies", PolicyListing)

    def show_policy(self, name: str) -> PolicyDetail:
        return self._call("GET", self._policy_path(name), PolicyDetail)

    def validate_policy(self, text: PolicyText) -> PolicyDetail:
        """Have clawd check a policy's text as it would load it (installs nothing)."""
        return self._call("POST", "/admin/policies/validate", PolicyDetail, body=text)

    def install_policy(self, text: PolicyText) -> PolicyDetail:
        """Check and install a policy under its own name; it routes clawd's next request."""
        return self._call("POST", "/admin/policies", PolicyDetail, body=text)

    def explain_route(self, name: str, request: ExplainRequest) -> RouteExplanation:
        return self._call(
            "POST", f"{self._policy_path(name)}/explain", RouteExplanation, body=request
        )

    def calibrate_policy(
        self, name: str, request: CalibrateRequest, progress: ProgressView
    ) -> CalibrationResult:
        """Run a policy's local tiers on labelled examples in clawd and choose thresholds."""
        return self._job(
            f"{self._policy_path(name)}/calibrate", CalibrationResult, progress, body=request
        )

    # --- health and OpenAI calls ---

    def health(self) -> Health:
        return Health.model_validate(self._get("/health"))

    def models(self) -> ModelList:
        return ModelList.model_validate(self._get("/v1/models"))

    def complete(self, body: dict[str, Any]) -> Completion:
        """A non-streaming /v1/completions call (snapshot save/load from the CLI)."""
        try:
            response = self._http.post("/v1/completions", json={**body, "stream": False})
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        self._raise_for(response)
        return Completion.model_validate(response.json())

    def chat(self, body: dict[str, Any]) -> ChatCompletion:
        """A non-streaming /v1/chat/completions call."""
        try:
            response = self._http.post("/v1/chat/completions", json={**body, "stream": False})
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        self._raise_for(response)
        return ChatCompletion.model_validate(response.json())

    def chat_stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[str | StreamEnd]:
        """Yield text pieces, then one `StreamEnd`."""
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if model:
            body["model"] = model
        if max_tokens:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        finish: str | None = None
        claw: ClawInfo | None = None
        usage: Usage | None = None
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: ") :]
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if "error" in data:
                        err = data["error"]
                        cls = error_class_for(err.get("code"), 500)
                        raise cls(err.get("message", "generation failed"))
                    chunk = ChatCompletionChunk.model_validate(data)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
                        finish = choice.finish_reason or finish
                    claw = chunk.claw or claw
                    usage = chunk.usage or usage
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the stream early: {exc}") from None
        yield StreamEnd(finish, claw, usage)
