"""The adapter store's types as they cross the admin API: manifests, listings, install requests,
verify reports.

They live here, below the store, because the CLI renders them and must not import the store;
`store/adapters.py` builds them and the admin routes send them as they are.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AdapterManifest(BaseModel):
    """One installed LoRA adapter, as `<data>/adapters/<base>/<name>.json` records it."""

    model_config = ConfigDict(frozen=True)

    name: str
    base: str
    base_digest: str
    digest: str
    size: int
    alpha: float
    rank: int
    architecture: str
    targets: list[str]
    source: str
    created_at: datetime


class AdapterListing(BaseModel):
    """`GET /admin/adapters`: the installed adapters, by base then name."""

    adapters: list[AdapterManifest]


class AdapterInstallRequest(BaseModel):
    """`POST /admin/adapters/install`: fetch an adapter from a URL, verify it against its base
    model, install it. (A local file goes through `POST /admin/adapters/upload` instead.)"""

    url: str = Field(description="An http(s) URL of a LoRA GGUF file.")
    base: str = Field(description="The installed base model it is for.")
    name: str | None = Field(None, description="Name (default: from the URL's file name).")
    sha256: str | None = Field(None, description="Expected sha256 of the file (pinning).")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL; upload a local file instead")
        return url


class AdapterInstallJob(BaseModel):
    """What clawd asks its `adapter_install` build operation to do (name already resolved)."""

    base: str
    name: str
    source: str  # an http(s) URL, or an uploaded file in the daemon's data dir
    label: str  # what the manifest records as the source
    sha256: str | None = None


class AdapterCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    base: str
    name: str
    ok: bool


class AdapterVerifyReport(BaseModel):
    """`POST /admin/adapters/verify`: every adapter's bytes re-hashed."""

    results: list[AdapterCheck]
