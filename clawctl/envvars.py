"""The table of every environment variable clawctl and clawd read (documentation data only).

`config.py` is the one module that reads them; this table is separate so `clawctl --help` can show
it without importing the config machinery.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    description: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("CLAW_HOME", "(platformdirs)", "Re-root data, cache, config and runtime dirs here."),
    EnvVar("CLAW_SOCKET", "<runtime dir>/clawd.sock", "Unix socket clawd serves and clawctl uses."),
    EnvVar("CLAW_CONFIG", "<config dir>/clawd.toml", "Daemon config file (falls back to shipped)."),
    EnvVar("CLAW_DOWNLOAD_CACHE", "<cache dir>/downloads", "Where fetched model sources are kept."),
    EnvVar("CLAW_PROFILE", "auto", "Edge profile name, or 'auto' to detect the device."),
    EnvVar("CLAW_URL", "", "Talk to clawd over TCP at this URL instead of the socket."),
    EnvVar(
        "CLAW_TOKEN", "", "Bearer token for TCP (client side and, for clawd, the expected one)."
    ),
    EnvVar("CLAW_LOG_LEVEL", "info", "clawd log level."),
    EnvVar("AWS_ACCESS_KEY_ID", "", "Fleet store key id, unless [fleet] credentials_file is set."),
    EnvVar("AWS_SECRET_ACCESS_KEY", "", "Fleet store secret, with AWS_ACCESS_KEY_ID."),
    EnvVar("CLAW_FLEET_LEDGER_DSN", "", "Postgres URL the ledger ships to (or ledger_dsn_file)."),
)
