"""The only reader of environment variables and configuration files.

Everything else receives a frozen `ClientConfig` or `DaemonConfig`. `ENV_VARS` documents every
variable; the CLI shows it in `--help` and `clawctl env`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clawctl.envvars import ENV_VARS, EnvVar
from clawctl.errors import BadInput
from clawctl.paths import SYSTEM_SOCKET, Paths
from clawctl.resources import default_daemon_config

__all__ = ["ENV_VARS", "EnvVar", "load_client_config", "load_daemon_config", "load_paths"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
DEFAULT_MAX_BODY_BYTES = 16 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The longest keep_alive (~68 years: "keep loaded"), what Ollama's negative keep_alive becomes
# too: finite, so an expiry time stays a date every platform can represent and serialize.
KEEP_LOADED_SECONDS = float(2**31)


class DaemonSection(_Strict):
    socket: str = ""
    socket_mode: str = "0660"
    socket_group: str = ""
    profile: str = "auto"
    default_model: str = "smollm2-135m"
    keep_alive_seconds: float = Field(300.0, ge=0, le=KEEP_LOADED_SECONDS)
    graceful_timeout_seconds: float = Field(30.0, ge=0)
    max_queue: int = Field(64, ge=1)
    # Largest request body clawd reads (413 beyond it); uploads stream to disk and are exempt.
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    log_level: LogLevel = "info"

    @field_validator("socket_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError("socket_mode must be an octal string such as '0660'") from None
        if mode & ~0o777:
            raise ValueError("socket_mode must be within 0777")
        return value


class TcpSection(_Strict):
    listen: str = ""
    token_file: str = ""
    admin: bool = False  # TCP clients may change the daemon's data (POST/PUT/DELETE /admin/…)


class SnapshotSection(_Strict):
    pool: bool = True
    # While a client handles an answer, compute the prefix its next call is expected to start
    # with (runtime/anticipation.py); costs idle CPU only.
    anticipate: bool = True
    pool_min_tokens: int = Field(512, ge=16)
    block_tokens: int = Field(256, ge=16)
    budget_mb: int = Field(0, ge=0)


class LedgerSection(_Strict):
    retention_days: float = Field(90.0, gt=0)


class CacheSection(_Strict):
    """The answer cache: identical deterministic requests in flight share one generation, and
    finished answers are reused (exact match, then by prompt embedding)."""

    enabled: bool = True
    embedding_model: str = "minilm-l6"  # semantic lookup is off while it is not installed
    threshold: float = Field(0.998, gt=0, le=1)
    sampled: bool = False  # answer requests with temperature > 0 from the cache too
    max_entries: int = Field(2048, ge=1)
    max_mb: int = Field(64, ge=1)
    ttl_seconds: float = Field(86400.0, gt=0)


class FleetSection(_Strict):
    """S3-compatible object storage the boxes of a fleet share frozen state through
    (docs/fleet.md). Off while `endpoint` is empty. Credentials come from `credentials_file` (TOML
    with `access_key_id` and `secret_access_key`) or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""

    endpoint: str = ""
    bucket: str = "clawd"
    prefix: str = "fleet"
    region: str = "us-east-1"
    credentials_file: str = ""
    box_id: str = ""  # this box's name in the fleet; empty: the host name
    upload: bool = True  # push new pool blocks and named snapshots in the background
    fetch: bool = True  # on a local pool miss, hydrate a longer prefix another box computed
    # Share `claw.session` states too, so a session moves between boxes: each call's state is
    # uploaded (an agent's is ~150 MB at 12k tokens), and a box takes the fleet's when newer.
    sessions: bool = False
    upload_queue: int = Field(256, ge=1)
    # What a fetch is weighed against until both are measured on this box: fetch a prefix
    # when size / bandwidth < its tokens / prefill rate.
    assumed_bandwidth_mb_s: float = Field(50.0, gt=0)
    assumed_prefill_tokens_s: float = Field(100.0, gt=0)
    index_refresh_seconds: float = Field(5.0, ge=0)
    # The fleet ledger: a file holding a libpq connection string (a postgresql:// URL with its
    # password), or CLAW_FLEET_LEDGER_DSN; empty: this box's ledger stays local.
    ledger_dsn_file: str = ""
    ledger_batch: int = Field(500, ge=1, le=10_000)
    ledger_interval_seconds: float = Field(10.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL")
        return value


@dataclass(frozen=True)
class FleetCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)


class ConfigFile(_Strict):
    daemon: DaemonSection = DaemonSection()
    tcp: TcpSection = TcpSection()
    snapshots: SnapshotSection = SnapshotSection()
    ledger: LedgerSection = LedgerSection()
    cache: CacheSection = CacheSection()
    fleet: FleetSection = FleetSection()
    # Speculative decoding with a draft model: target model name -> draft model name (checked
    # when the target loads: installed, GGUF, the same vocabulary).
    drafts: dict[str, str] = {}


@dataclass(frozen=True)
class SystemdEnv:
    notify_socket: str | None
    watchdog_usec: int | None
    listen_fds: int
    listen_pid: int | None


@dataclass(frozen=True)
class DaemonConfig:
    paths: Paths
    socket_path: Path
    socket_mode: int
    socket_group: str | None
    tcp_host: str | None
    tcp_port: int | None
    tcp_token: str | None
    profile: str
    default_model: str
    keep_alive_seconds: float
    graceful_timeout_seconds: float
    max_queue: int
    log_level: str
    config_file: Path
    systemd: SystemdEnv
    snapshots: SnapshotSection
    ledger: LedgerSection
    cache: CacheSection = field(default_factory=CacheSection)
    drafts: Mapping[str, str] = field(default_factory=dict)
    tcp_admin: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    fleet: FleetSection = field(default_factory=FleetSection)
    fleet_credentials: FleetCredentials | None = None
    fleet_ledger_dsn: str | None = field(default=None, repr=False)

    def redacted(self) -> dict[str, str]:
        """The effective settings for the start-up log, with secrets hidden."""
        return {
            "socket": str(self.socket_path),
            "socket_mode": oct(self.socket_mode),
            "socket_group": self.socket_group or "-",
            "tcp": f"{self.tcp_host}:{self.tcp_port}" if self.tcp_host else "off",
            "tcp_token": "***" if self.tcp_token else "-",
            "profile": self.profile,
            "default_model": self.default_model,
            "data_dir": str(self.paths.data_dir),
            "config_file": str(self.config_file),
            "max_body_bytes": str(self.max_body_bytes),
            "fleet": f"{self.fleet.endpoint}/{self.fleet.bucket}" if self.fleet.endpoint else "off",
            "fleet_ledger": "on" if self.fleet_ledger_dsn else "off",
            "log_level": self.log_level,
        }


@dataclass(frozen=True)
class ClientConfig:
    paths: Paths
    socket_path: Path
    url: str | None
    token: str | None
    profile: str


def environment() -> Mapping[str, str]:
    """The whole environment, for routing policies: their remote tiers name the variables that
    hold a base URL or an API key (`base_url_env`, `api_key_env`)."""
    return os.environ


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def load_paths() -> Paths:
    home = _env("CLAW_HOME")
    cache = _env("CLAW_DOWNLOAD_CACHE")
    return Paths.build(
        Path(home).expanduser() if home else None, Path(cache).expanduser() if cache else None
    )


def _config_path(paths: Paths, explicit: Path | None = None) -> Path:
    """`explicit` (clawd --config), else CLAW_CONFIG, else the user's clawd.toml, else the
    shipped defaults."""
    if explicit is not None:
        return explicit.expanduser()
    configured = _env("CLAW_CONFIG")
    if configured:
        return Path(configured).expanduser()
    if paths.config_file.is_file():
        return paths.config_file
    return default_daemon_config()


def read_config_file(path: Path) -> ConfigFile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadInput(f"{path}: {where}: {first['msg']}") from None


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise BadInput(f"a TCP address looks like '127.0.0.1:11435' (HOST:PORT), got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _socket_path(paths: Paths, configured: str) -> Path:
    explicit = _env("CLAW_SOCKET")
    if explicit:
        return Path(explicit)
    if configured:
        return Path(configured)
    return paths.default_socket


def _read_token(path: Path) -> str:
    try:
        return path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BadInput(f"cannot read the token file {path}: {exc.strerror}") from None


def _fleet_credentials(fleet: FleetSection) -> FleetCredentials | None:
    """The fleet store's keys: its credentials file, else the AWS variables, else none (an
    endpoint that needs none, or an instance role the S3 library finds itself)."""
    if fleet.credentials_file:
        path = Path(fleet.credentials_file).expanduser()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise BadInput(
                f"cannot read the fleet credentials file {path}: {exc.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"{path}: invalid TOML: {exc}") from None
        key, secret = raw.get("access_key_id"), raw.get("secret_access_key")
        if not isinstance(key, str) or not isinstance(secret, str) or not key or not secret:
            raise BadInput(f"{path} needs access_key_id and secret_access_key (strings)")
        return FleetCredentials(key, secret)
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    return FleetCredentials(key, secret) if key and secret else None


def _fleet_ledger_dsn(fleet: FleetSection) -> str | None:
    if fleet.ledger_dsn_file:
        path = Path(fleet.ledger_dsn_file).expanduser()
        try:
            dsn = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BadInput(
                f"cannot read the fleet ledger DSN file {path}: {exc.strerror}"
            ) from None
        if not dsn:
            raise BadInput(f"{path} is empty; it should hold a postgresql:// connection string")
        return dsn
    return _env("CLAW_FLEET_LEDGER_DSN")


def load_daemon_config(
    socket: Path | None = None,
    profile: str | None = None,
    *,
    config_file: Path | None = None,
    tcp: str | None = None,
    token_file: Path | None = None,
    log_level: str | None = None,
) -> DaemonConfig:
    """The daemon's settings. The arguments are command-line overrides (`clawd --socket ...`,
    `clawctl serve`); each wins over its CLAW_* variable, which wins over clawd.toml."""
    paths = load_paths()
    config_path = _config_path(paths, config_file)
    file = read_config_file(config_path)
    host = port = None
    token = _env("CLAW_TOKEN")
    listen = tcp if tcp is not None else file.tcp.listen
    if listen:
        host, port = _parse_listen(listen)
        if token_file is not None:
            token = _read_token(token_file)
        elif file.tcp.token_file:
            token = _read_token(Path(file.tcp.token_file))
        if not token:
            raise BadInput(
                "TCP listening is on but there is no token: set [tcp] token_file in clawd.toml, "
                "CLAW_TOKEN, or --token-file"
            )
    level = log_level or _env("CLAW_LOG_LEVEL") or file.daemon.log_level
    if level not in LOG_LEVELS:
        raise BadInput(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    watchdog = _env("WATCHDOG_USEC")
    listen_pid = _env("LISTEN_PID")
    return DaemonConfig(
        paths=paths,
        socket_path=socket or _socket_path(paths, file.daemon.socket),
        socket_mode=int(file.daemon.socket_mode, 8),
        socket_group=file.daemon.socket_group or None,
        tcp_host=host,
        tcp_port=port,
        tcp_token=token,
        profile=profile or _env("CLAW_PROFILE") or file.daemon.profile,
        default_model=file.daemon.default_model,
        keep_alive_seconds=file.daemon.keep_alive_seconds,
        graceful_timeout_seconds=file.daemon.graceful_timeout_seconds,
        max_queue=file.daemon.max_queue,
        log_level=level,
        config_file=config_path,
        snapshots=file.snapshots,
        ledger=file.ledger,
        cache=file.cache,
        drafts=file.drafts,
        tcp_admin=file.tcp.admin,
        max_body_bytes=file.daemon.max_body_bytes,
        fleet=file.fleet,
        fleet_credentials=_fleet_credentials(file.fleet) if file.fleet.endpoint else None,
        fleet_ledger_dsn=_fleet_ledger_dsn(file.fleet),
        systemd=SystemdEnv(
            notify_socket=_env("NOTIFY_SOCKET"),
            watchdog_usec=int(watchdog) if watchdog and watchdog.isdigit() else None,
            listen_fds=int(_env("LISTEN_FDS") or 0),
            listen_pid=int(listen_pid) if listen_pid and listen_pid.isdigit() else None,
        ),
    )


def load_client_config() -> ClientConfig:
    """Client side: find the socket the same way clawd does, plus the system service's socket."""
    paths = load_paths()
    configured = ""
    config_path = _config_path(paths)
    if config_path.is_file():
        try:
            configured = read_config_file(config_path).daemon.socket
        except BadInput:
            configured = ""
    socket_path = _socket_path(paths, configured)
    if (
        not _env("CLAW_SOCKET")
        and not _env("CLAW_HOME")
        and not socket_path.exists()
        and SYSTEM_SOCKET.exists()
    ):
        socket_path = SYSTEM_SOCKET
    return ClientConfig(
        paths=paths,
        socket_path=socket_path,
        url=_env("CLAW_URL"),
        token=_env("CLAW_TOKEN"),
        profile=_env("CLAW_PROFILE") or "auto",
    )
