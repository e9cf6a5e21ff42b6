"""What a saved llama.cpp state belongs to, and the token history it holds.

`StateIdentity` crosses two boundaries: engines compute it for their context, and the snapshot
format writes it into every file's header and refuses a file whose identity differs. It lives
here, below both, so engines never import the snapshot store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class AdapterRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: str
    scale: float


class StateIdentity(BaseModel):
    """Everything that must match for a saved state to be valid in a context."""

    model_config = ConfigDict(frozen=True)

    model_sha256: str
    adapters: tuple[AdapterRef, ...] = ()
    state_format: str
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    sequences: int = 1  # KV streams of the context (the profile's `parallel`)
    kv_pool: int = 0  # cells of a pool the sequences share (0: a stream per sequence)

    def key(self) -> str:
        """A short stable digest: names the pool directory of this identity (fields added
        later are left out at their defaults, so existing pools keep their names)."""
        unset = {"kv_pool"} if self.kv_pool == 0 else set()
        return hashlib.sha256(self.model_dump_json(exclude=unset).encode()).hexdigest()[:20]

    def mismatch(self, other: StateIdentity) -> str | None:
        for field in type(self).model_fields:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field} is {_short(theirs)} in the snapshot but {_short(mine)} here"
        return None


def _short(value: object) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 and " " not in text else text


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
