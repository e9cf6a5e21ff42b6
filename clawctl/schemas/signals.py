"""What the entropy meter saw over one generation: one type for the engine, router and wire.

The meter produces `Signals`, the router compares them with a tier's thresholds, calibration
reads them back from responses (`claw.entropy`), so the same fields carry the same names
everywhere. Responses round them to 4 decimals (`rounded`). Older clients' short names (`mean`,
`max`, `window`) are still accepted when reading.
"""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

# The summaries a `score` model may weigh (calibration and policies name them).
FEATURES = (
    "tokens",
    "mean_entropy",
    "max_entropy",
    "window_entropy",
    "min_prob",
    "first_margin",
    "answer_entropy",
    "answer_margin",
)

# The meter signals a tier may escalate on (policies name them as `[tiers.escalate]` keys).
SIGNALS = (
    "window_entropy",
    "max_entropy",
    "min_prob",
    "first_margin",
    "answer_entropy",
    "answer_margin",
    "score",
    "probe",
)
# Signals where a *low* value means unsure; for the others a high value does.
LOW_IS_UNSURE = frozenset({"min_prob", "first_margin", "answer_margin"})


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class Signals(BaseModel):
    """The meter's summary (nats, probabilities) of a generation, or of it up to where the meter
    stopped it."""

    model_config = ConfigDict(frozen=True)

    tokens: int
    mean_entropy: float = Field(validation_alias=AliasChoices("mean_entropy", "mean"))
    max_entropy: float = Field(validation_alias=AliasChoices("max_entropy", "max"))
    window_entropy: float = Field(validation_alias=AliasChoices("window_entropy", "window"))
    min_prob: float
    first_margin: float | None
    answer_entropy: float | None = None
    answer_margin: float | None = None
    score: float | None = None
    probe: float | None = None
    first_top: tuple[tuple[int, float], ...] | None = Field(
        None,
        description="The first token's most likely (token id, log-probability) pairs, best "
        "first, when asked for: what calibration fits a first-token probe on.",
    )

    def value(self, signal: str) -> float | None:
        value: float | None = getattr(self, signal)
        return value

    def features(self) -> dict[str, float | None]:
        """The summaries under the names a `score` model and calibration use."""
        return {name: self.value(name) for name in FEATURES}

    def rounded(self) -> Signals:
        """The same signals to 4 decimals, as responses carry them."""
        return self.model_copy(
            update={
                "mean_entropy": round(self.mean_entropy, 4),
                "max_entropy": round(self.max_entropy, 4),
                "window_entropy": round(self.window_entropy, 4),
                "min_prob": round(self.min_prob, 4),
                "first_margin": _round(self.first_margin),
                "answer_entropy": _round(self.answer_entropy),
                "answer_margin": _round(self.answer_margin),
                "score": _round(self.score),
                "probe": _round(self.probe),
            }
        )
