"""Asking one tier of a policy directly, greedily, outside the cascade: what calibration does
with labelled examples and what an audit does after a response. One way for both, so a
calibrated answer and an audited one are produced alike (the tier's model, adapters and prices;
no answer cache; a remote tier through its pool)."""

from __future__ import annotations

from dataclasses import dataclass

from clawctl.engines.base import Prompt, SamplingParams
from clawctl.routing.remote import RemoteDone, RemoteRequest
from clawctl.schemas.openai import AdapterChoice, ClawRequest, MeterRequest
from clawctl.schemas.policy import Tier
from clawctl.schemas.signals import Signals
from clawctl.services import Services


@dataclass(frozen=True)
class TierAnswer:
    text: str
    cost: float  # at the tier's prices
    signals: Signals | None = None  # a local tier's meter readings, when a meter was asked
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def ask_local(
    services: Services, tier: Tier, prompt: Prompt, max_tokens: int | None, app: str,
    meter: MeterRequest | None = None,
) -> TierAnswer:  # fmt: skip
    """The tier's model answers `prompt` as a request of its own (in the ledger under `app`)."""
    # Imported here: generation imports the audit module, which imports this one.
    from clawctl.serving.dedup import begin
    from clawctl.serving.generation import GenerationRun

    run = GenerationRun(
        services,
        "chat" if prompt.chat is not None else "completions",
        tier.model,
        prompt,
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        ClawRequest(
            app=app,
            meter=meter,
            cache=False,
            adapters=[AdapterChoice(name=a.name, scale=a.scale) for a in tier.adapters],
        ),
        None,
    )
    await begin(run)
    text = await run.answer()
    usage = run.usage()
    entropy = run.info().entropy if meter is not None else None
    cost = tier.cost(usage.prompt_tokens, usage.completion_tokens)
    return TierAnswer(text, cost, entropy, usage.prompt_tokens, usage.completion_tokens)


async def ask_remote(
    services: Services, tier: Tier, prompt: Prompt, max_tokens: int | None,
    request_id: str | None = None,
) -> TierAnswer:  # fmt: skip
    """The remote tier answers `prompt`; raises RemoteFailure when its pool cannot."""
    request = RemoteRequest(
        messages=prompt.chat, text=prompt.text, max_tokens=max_tokens, temperature=0.0,
        top_p=1.0, stop=(), seed=None, request_id=request_id,
    )  # fmt: skip
    pieces: list[str] = []
    usage: RemoteDone | None = None
    async for item in services.remote(tier).stream(request):
        if isinstance(item, str):
            pieces.append(item)
        else:
            usage = item
    if usage is None:
        return TierAnswer("".join(pieces), 0.0)
    cost = tier.cost(usage.prompt_tokens, usage.completion_tokens)
    return TierAnswer("".join(pieces), cost, None, usage.prompt_tokens, usage.completion_tokens)
