"""Build operations on LoRA adapters: install (registered in build/ops.py).

An install reads the base model's GGUF and the adapter's with the `gguf` package and hashes the
adapter's bytes: work kept out of clawd's process. clawd resolves and validates the name before it
starts the operation, so this runs only what the store does.
"""

from __future__ import annotations

from clawctl.build.jobstream import LineProgress, LineWriter
from clawctl.build.ops import op
from clawctl.config import load_paths
from clawctl.schemas.adapters import AdapterInstallJob, AdapterManifest
from clawctl.store.adapters import AdapterStore
from clawctl.store.models import ModelStore


@op("adapter_install", AdapterInstallJob)
def adapter_install(
    request: AdapterInstallJob, progress: LineProgress, writer: LineWriter
) -> AdapterManifest:
    """Verify an adapter (a URL, or an upload in the daemon's data dir) against its base model
    and install it."""
    store = AdapterStore(ModelStore(load_paths()))
    return store.install(
        request.source,
        base=request.base,
        name=request.name,
        sha256=request.sha256,
        progress=progress,
        label=request.label,
    )
