"""The small interface the fleet needs from object storage, over boto3.

boto3 is the S3 client every S3-compatible server (AWS, SeaweedFS, MinIO, Ceph, R2) is tested
against, and it supports the conditional write (`If-None-Match: *`) that makes concurrent uploads
of one object harmless. It is imported on first use, so a box without a fleet never loads it.
The SDK's own retries are off: the uploader retries with its own back-off, and a read-through
fetch that fails falls back to prefill at once instead of retrying while a request waits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from clawctl.config import FleetCredentials
from clawctl.errors import ClawError

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger("clawd.fleet")
READ_CHUNK = 1 << 20


class FleetUnavailable(ClawError):
    """The fleet store could not be reached or refused the request (retry later)."""

    http_status = 503
    code = "fleet_unavailable"


class FleetObjectMissing(FleetUnavailable):
    """The store answered, but the object is not there (removed by `fleet gc`, say)."""

    http_status = 404
    code = "fleet_object_missing"


@dataclass(frozen=True)
class ObjectHead:
    size: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    modified: float  # Unix time the server last wrote it


class Bucket:
    """One bucket of an S3-compatible server."""

    def __init__(
        self, endpoint: str, bucket: str, region: str, credentials: FleetCredentials | None,
        timeout: float = 30.0,
    ) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.name = bucket
        self._region = region
        self._credentials = credentials
        self._timeout = timeout
        self._client: BaseClient | None = None

    def _s3(self) -> BaseClient:
        if self._client is None:
            import boto3
            from botocore.config import Config

            keys = self._credentials
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self._region,
                aws_access_key_id=keys.access_key_id if keys else None,
                aws_secret_access_key=keys.secret_access_key if keys else None,
                config=Config(
                    retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=min(self._timeout, 5.0),
                    read_timeout=self._timeout,
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def _call(self, what: str, operation: str, **kwargs: Any) -> Any:
        """Run one S3 operation; a transport failure becomes FleetUnavailable, an answer with an
        error status stays a ClientError for the caller to read."""
        from botocore.exceptions import BotoCoreError

        try:
            return getattr(self._s3(), operation)(Bucket=self.name, **kwargs)
        except BotoCoreError as exc:
            raise FleetUnavailable(f"fleet store {self.endpoint}: {what} failed: {exc}") from None

    @staticmethod
    def _status(exc: Exception) -> int:
        response = getattr(exc, "response", None) or {}
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))

    def _unavailable(self, what: str, exc: Exception) -> FleetUnavailable:
        response = getattr(exc, "response", None) or {}
        code = response.get("Error", {}).get("Code", "error")
        return FleetUnavailable(f"fleet store {self.endpoint}: {what} failed: {code}")

    def put_if_absent(self, key: str, body: IO[bytes], size: int, metadata: dict[str, str]) -> bool:
        """Write `key` unless it exists; False if it did (another box wrote it first: content
        addressed, so the same bytes)."""
        from botocore.exceptions import ClientError

        try:
            self._call(
                f"writing {key}", "put_object", Key=key, Body=body, ContentLength=size,
                Metadata=metadata, IfNoneMatch="*",
            )  # fmt: skip
        except ClientError as exc:
            if self._status(exc) in (409, 412):
                return False
            raise self._unavailable(f"writing {key}", exc) from None
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(f"writing {key}", "put_object", Key=key, Body=data)
        except ClientError as exc:
            raise self._unavailable(f"writing {key}", exc) from None

    def get_bytes(self, key: str) -> bytes | None:
        """A small object whole (a pointer); None if there is no such key."""
        from botocore.exceptions import ClientError

        try:
            response = self._call(f"reading {key}", "get_object", Key=key)
            data: bytes = response["Body"].read()
            return data
        except ClientError as exc:
            if self._status(exc) == 404:
                return None
            raise self._unavailable(f"reading {key}", exc) from None

    def download(self, key: str, sink: IO[bytes]) -> str:
        """Stream `key` into `sink`; returns the sha256 of what was written."""
        from botocore.exceptions import BotoCoreError, ClientError

        digest = hashlib.sha256()
        try:
            response = self._call(f"reading {key}", "get_object", Key=key)
            for chunk in response["Body"].iter_chunks(READ_CHUNK):
                digest.update(chunk)
                sink.write(chunk)
        except ClientError as exc:
            if self._status(exc) == 404:
                raise FleetObjectMissing(f"fleet object {key} is gone") from None
            raise self._unavailable(f"reading {key}", exc) from None
        except BotoCoreError as exc:  # the connection dropped mid-body
            raise FleetUnavailable(f"fleet store {self.endpoint}: reading {key}: {exc}") from None
        return digest.hexdigest()

    def head(self, key: str) -> ObjectHead | None:
        from botocore.exceptions import ClientError

        try:
            response = self._call(f"looking up {key}", "head_object", Key=key)
        except ClientError as exc:
            if self._status(exc) == 404:
                return None
            raise self._unavailable(f"looking up {key}", exc) from None
        return ObjectHead(int(response["ContentLength"]), dict(response.get("Metadata", {})))

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, page by page."""
        return (entry.key for entry in self.listing(prefix))

    def presigned_get(self, key: str, seconds: int = 3600) -> str:
        """A URL anyone holding it may GET `key` from for `seconds` (signed locally: no call)."""
        url: str = self._s3().generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=seconds
        )
        return url

    def delete(self, key: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(f"removing {key}", "delete_object", Key=key)
        except ClientError as exc:
            if self._status(exc) != 404:
                raise self._unavailable(f"removing {key}", exc) from None

    def listing(self, prefix: str) -> Iterator[Listed]:
        """Every object under `prefix` with its size and time, page by page."""
        from botocore.exceptions import ClientError

        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            try:
                page = self._call(f"listing {prefix}", "list_objects_v2", Prefix=prefix, **extra)
            except ClientError as exc:
                raise self._unavailable(f"listing {prefix}", exc) from None
            for entry in page.get("Contents", []):
                modified = entry["LastModified"].timestamp()
                yield Listed(str(entry["Key"]), int(entry["Size"]), modified)
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
