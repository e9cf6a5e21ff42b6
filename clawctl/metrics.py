"""Prometheus metrics for clawd, on a registry of its own (injected, never the global one).

Besides clawd's own `clawd_*` series, token usage and operation time are also exported under the
OpenTelemetry GenAI semantic conventions (`gen_ai.client.token.usage` with `gen_ai.token.type`,
`gen_ai.client.operation.duration`), with their buckets and attribute names in Prometheus form,
so dashboards built for any GenAI client aggregate a fleet of boxes unchanged. Each tier a request
ran counts as one operation of its provider ("clawd" for local tiers, "openai" for remote ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The explicit bucket boundaries the GenAI semantic conventions recommend.
GEN_AI_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1 .. 67,108,864
GEN_AI_DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(14))  # 0.01 .. 81.92 s
GEN_AI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    prompt_tokens: Counter
    completion_tokens: Counter
    request_seconds: Histogram
    first_token_seconds: Histogram
    loaded_models: Gauge
    in_flight: Gauge
    tier_requests: Counter
    escalations: Counter
    draft_tokens: Counter
    draft_accepted: Counter
    cache_answers: Counter
    cache_tokens_saved: Counter
    embeddings: Counter
    gen_ai_token_usage: Histogram
    gen_ai_operation_duration: Histogram

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "clawd_requests",
                "Requests by endpoint and outcome.",
                ["endpoint", "status"],
                registry=registry,
            ),
            prompt_tokens=Counter(
                "clawd_prompt_tokens", "Prompt tokens evaluated.", ["model"], registry=registry
            ),
            completion_tokens=Counter(
                "clawd_completion_tokens", "Tokens generated.", ["model"], registry=registry
            ),
            request_seconds=Histogram(
                "clawd_request_seconds",
                "Generation request latency.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            first_token_seconds=Histogram(
                "clawd_first_token_seconds",
                "Time to first token.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            loaded_models=Gauge("clawd_loaded_models", "Models resident.", registry=registry),
            in_flight=Gauge("clawd_in_flight_requests", "Requests running.", registry=registry),
            tier_requests=Counter(
                "clawd_tier_runs",
                "Tiers run by routed requests.",
                ["policy", "tier"],
                registry=registry,
            ),
            escalations=Counter(
                "clawd_escalations",
                "Routed requests that escalated.",
                ["policy"],
                registry=registry,
            ),
            draft_tokens=Counter(
                "clawd_draft_tokens",
                "Tokens drafted by prompt lookup (speculative decoding).",
                ["model"],
                registry=registry,
            ),
            draft_accepted=Counter(
                "clawd_draft_accepted_tokens",
                "Drafted tokens the model confirmed.",
                ["model"],
                registry=registry,
            ),
            cache_answers=Counter(
                "clawd_cache_answers",
                "Requests answered without generating (exact, semantic, coalesced).",
                ["kind"],
                registry=registry,
            ),
            cache_tokens_saved=Counter(
                "clawd_cache_tokens_saved",
                "Prompt and completion tokens the answer cache spared.",
                registry=registry,
            ),
            embeddings=Counter(
                "clawd_embedding_inputs",
                "Texts embedded (API and semantic cache).",
                ["model"],
                registry=registry,
            ),
            gen_ai_token_usage=Histogram(
                "gen_ai_client_token_usage",
                "Number of input and output tokens used (OpenTelemetry gen_ai.client.token.usage).",
                [*GEN_AI_LABELS, "gen_ai_token_type"],
                buckets=GEN_AI_TOKEN_BUCKETS,
                registry=registry,
            ),
            gen_ai_operation_duration=Histogram(
                "gen_ai_client_operation_duration_seconds",
                "GenAI operation duration (OpenTelemetry gen_ai.client.operation.duration).",
                GEN_AI_LABELS,
                buckets=GEN_AI_DURATION_BUCKETS,
                registry=registry,
            ),
        )

    def gen_ai_operation(
        self, operation: str, provider: str, model: str, input_tokens: int, output_tokens: int,
        seconds: float,
    ) -> None:  # fmt: skip
        """One GenAI operation in OpenTelemetry's terms (`operation`: chat, text_completion)."""
        labels = (operation, provider, model)
        self.gen_ai_token_usage.labels(*labels, "input").observe(input_tokens)
        self.gen_ai_token_usage.labels(*labels, "output").observe(output_tokens)
        self.gen_ai_operation_duration.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
