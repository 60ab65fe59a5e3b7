"""The one exception type of the client: a gRPC status from the gateway, with its reason.

Every error status of the gateway carries, in its ``grpc-status-details-bin``
trailer, a ``google.rpc.Status`` holding one ``google.rpc.ErrorInfo`` (domain
``recgw.v1``): ``reason`` is the name of an ``ErrorReason`` of
protos/recgw/v1/errors.proto without its ``ERROR_REASON_`` prefix, and
``metadata`` facts such as ``committed_size``. Programs decide on ``code`` and
``reason``, never on ``message``, which is meant for people.

A few errors are raised by the client itself; their reasons are the
``CLIENT_*`` constants below (``RecgwError.from_client`` is True for them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "ERROR_DOMAIN",
    "RESUME_IMPOSSIBLE",
    "RETAIN_LIMIT_EXCEEDED",
    "SOURCE_MISMATCH",
    "SOURCE_NOT_SEEKABLE",
    "UPLOAD_ENDED",
    "RecgwError",
    "error_info",
]

ERROR_DOMAIN = "recgw.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Reasons of errors the client raises itself (never sent by the gateway, except UPLOAD_ENDED,
# which the client also uses when a status query shows the upload ended).
RETAIN_LIMIT_EXCEEDED = "RETAIN_LIMIT_EXCEEDED"
"""RESOURCE_EXHAUSTED: a live source produced more than the retained bytes may hold
(memory ``retain_limit`` plus disk ``spill_limit``) while the gateway could not take them."""
SOURCE_NOT_SEEKABLE = "SOURCE_NOT_SEEKABLE"
"""FAILED_PRECONDITION: continuing an upload with committed bytes needs a seekable source
holding the whole object, or a source of the bytes from the committed size on
(``source_offset``)."""
SOURCE_MISMATCH = "SOURCE_MISMATCH"
"""FAILED_PRECONDITION or DATA_LOSS: the upload named by the upload id does not fit the
source (another size, other checksums, fewer committed bytes than the source skips)."""
UPLOAD_ENDED = "UPLOAD_ENDED"
"""FAILED_PRECONDITION: the upload was aborted, expired or salvaged; start a new one."""
RESUME_IMPOSSIBLE = "RESUME_IMPOSSIBLE"
"""DATA_LOSS or NOT_FOUND: the gateway's committed size is before the first byte the
client still holds (or the gateway forgot the upload), so it cannot be continued."""

_CLIENT_REASONS = frozenset(
    {RETAIN_LIMIT_EXCEEDED, SOURCE_NOT_SEEKABLE, SOURCE_MISMATCH, RESUME_IMPOSSIBLE}
)
_REDACTED = "[REDACTED]"
# Shorter values could match ordinary words of a message.
_MIN_REDACT_LENGTH = 8


def error_info(trailing_metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, dict[str, str]]:
    """The recgw ErrorInfo reason and metadata in a call's trailers ("" and {} if none)."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return "", {}
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return str(info.reason), {str(k): str(v) for k, v in info.metadata.items()}
    return "", {}


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if len(secret) >= _MIN_REDACT_LENGTH:
            text = text.replace(secret, _REDACTED)
    return text


class RecgwError(Exception):
    """The gateway (or the channel, or the client itself) refused or failed a call.

    ``code`` is the ``grpc.StatusCode``, ``message`` the explanation for people,
    ``reason`` the ErrorInfo reason ("" when the status carried none, e.g. a
    lost connection), ``metadata`` the ErrorInfo facts (``committed_size``,
    ``upload_id``, ``field``...). ``upload_id`` is set for upload errors (the
    client chooses every upload's id), so that the upload can be inspected,
    continued or aborted later. ``attempts`` is the number of streams an upload
    opened before it gave up (1 for every other call).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        upload_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.upload_id = upload_id
        self.attempts = attempts

    @property
    def from_client(self) -> bool:
        """True for the errors the client raises itself (see the ``CLIENT_*`` reasons)."""
        return self.reason in _CLIENT_REASONS

    def committed_size(self) -> int | None:
        """The ``committed_size`` fact of the error, if it has one."""
        value = self.metadata.get("committed_size", "")
        return int(value) if value.isdigit() else None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"RecgwError(code={self.code!r}, reason={self.reason!r}, message={self.message!r})"

    @classmethod
    def from_status(
        cls,
        code: grpc.StatusCode,
        message: str,
        trailing_metadata: Iterable[tuple[str, Any]] | None = None,
        *,
        upload_id: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> RecgwError:
        """An error for a status and its trailers; any of ``secrets`` is redacted."""
        reason, metadata = error_info(trailing_metadata)
        return cls(
            code,
            _redact(message, secrets),
            reason=reason,
            metadata={k: _redact(v, secrets) for k, v in metadata.items()},
            upload_id=upload_id,
        )

    @classmethod
    def from_rpc_error(
        cls,
        error: grpc.aio.AioRpcError,
        *,
        upload_id: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> RecgwError:
        """Wrap a grpc.aio error; any of ``secrets`` in the message is redacted."""
        return cls.from_status(
            error.code(),
            error.details() or "",
            error.trailing_metadata(),
            upload_id=upload_id,
            secrets=secrets,
        )
