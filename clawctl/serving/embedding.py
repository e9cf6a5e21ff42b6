"""One embedding request, whichever face it came through (`/v1/embeddings`, `/api/embed`,
`/api/embeddings`): embed the texts on the model's own thread, then count it (metrics) and
account for it (a ledger row under the face's endpoint), so both faces refuse, count and bill
an embedding the same way."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from clawctl.engines.onnx.embed import Embeddings
from clawctl.errors import BadInput, ClawError
from clawctl.ledger import LedgerRow
from clawctl.services import Services
from clawctl.serving.caller import PeerCred


@dataclass(frozen=True)
class EmbedOutcome:
    model: str
    result: Embeddings
    seconds: float  # from the request's start to its vectors

    @property
    def dim(self) -> int:
        return int(self.result.vectors.shape[1])

    def vectors(self) -> list[list[float]]:
        rows: list[list[float]] = self.result.vectors.tolist()
        return rows


async def embed_texts(
    services: Services,
    endpoint: str,
    model: str,
    texts: list[str],
    peer: PeerCred | None,
    app: str | None = None,
    dimensions: int | None = None,
) -> EmbedOutcome:
    """Embed `texts` with the embedding model `model` (texts longer than its limit are
    truncated, as sentence-transformers does); metrics and ledger row under `endpoint`.
    `dimensions` is what the client asked for: clawd cannot shorten vectors, so anything but the
    model's own size is a 400 rather than silently longer vectors."""
    started = time.perf_counter()
    try:
        if not texts or any(not text.strip() for text in texts):
            raise BadInput("input texts must not be empty", param="input")
        result = await services.embeddings.embed(model, texts)
        dim = int(result.vectors.shape[1])
        if dimensions is not None and dimensions != dim:
            raise BadInput(
                f"{model} gives {dim} dimensions; it cannot shorten them", param="dimensions"
            )
    except ClawError as exc:
        services.metrics.requests.labels(endpoint, str(exc.http_status)).inc()
        raise
    elapsed = time.perf_counter() - started
    tokens = result.total_tokens
    services.metrics.requests.labels(endpoint, "200").inc()
    services.metrics.embeddings.labels(model).inc(len(texts))
    services.metrics.prompt_tokens.labels(model).inc(tokens)
    services.ledger.record(
        LedgerRow(
            request_id=uuid.uuid4().hex[:24],
            ts=time.time(),
            uid=peer.uid if peer else None,
            pid=peer.pid if peer else None,
            app=app,
            endpoint=endpoint,
            model=model,
            prompt_tokens=tokens,
            completion_tokens=0,
            usage_by_tier={},
            prefill_tokens_saved=0,
            prefix_source=None,
            latency_ms=elapsed * 1000,
            finish_reason="stop",
        )
    )
    return EmbedOutcome(model, result, elapsed)
