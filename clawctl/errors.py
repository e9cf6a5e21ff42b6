"""The error vocabulary shared by the CLI, the client, the HTTP API and the daemon.

Every failure a user can cause or fix is a `ClawError` subclass with a one-line message saying what
failed and what to do next. Two places turn them into something else: the CLI root (exit codes) and
the API's exception handler (OpenAI error envelope). The client decodes the envelope back into the
same class by its `code`, so a daemon-side error reads the same in the terminal.
"""

from __future__ import annotations

from typing import ClassVar


class ClawError(Exception):
    """Base of all user-facing errors."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadInput(ClawError):
    """The caller sent something we cannot use (usage error, exit code 2, HTTP 400)."""

    exit_code = 2
    http_status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextOverflow(BadInput):
    """The prompt does not fit the model's context window."""

    code = "context_length_exceeded"


class RequestTooLarge(ClawError):
    """The request body is larger than clawd reads ([daemon] max_body_bytes; HTTP 413)."""

    exit_code = 2
    http_status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class NotFound(ClawError):
    """A named thing (model, profile, route) does not exist."""

    exit_code = 2
    http_status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Unauthorized(ClawError):
    exit_code = 2
    http_status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClawError):
    """The caller may not do this here (e.g. change the daemon's data over TCP)."""

    exit_code = 2
    http_status = 403
    type = "permission_error"
    code = "forbidden"


class IntegrityError(ClawError):
    """Stored or downloaded bytes do not match their recorded checksum."""

    http_status = 500
    code = "integrity_error"


class FetchError(ClawError):
    """A model source (PyPI, URL, file) could not be fetched."""

    http_status = 502
    code = "fetch_failed"


class EngineError(ClawError):
    """The inference engine failed to load or run a model."""

    http_status = 500
    code = "engine_error"


class RemoteTierError(ClawError):
    """The remote tier failed (down, too slow, or an answer that is not OpenAI-shaped) and the
    routing policy says a failure is an error rather than a degraded local answer."""

    http_status = 502
    type = "server_error"
    code = "remote_tier_failed"


class Overloaded(ClawError):
    """The daemon cannot take more work right now; retry later."""

    http_status = 503
    type = "server_error"
    code = "overloaded"


class DaemonUnavailable(ClawError):
    """clawd is not running or not reachable on its socket (exit code 3)."""

    exit_code = 3
    http_status = 503
    code = "daemon_unavailable"


class DaemonStartupError(ClawError):
    """clawd could not start (socket owned by a live daemon, bad config…) (exit code 3)."""

    exit_code = 3
    code = "startup_failed"


def _all_subclasses(cls: type[ClawError]) -> list[type[ClawError]]:
    found: list[type[ClawError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def error_class_for(code: str | None, status: int) -> type[ClawError]:
    """Map an API error `code` (or, failing that, the HTTP status) back to its class."""
    for cls in _all_subclasses(ClawError):
        if cls.code == code:
            return cls
    for cls in (BadInput, NotFound, Unauthorized, Overloaded):
        if cls.http_status == status:
            return cls
    return ClawError
