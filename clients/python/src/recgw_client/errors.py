"""The one exception type of the client: a gRPC status from the gateway."""

from __future__ import annotations

import grpc

__all__ = ["RecgwError"]

_REDACTED = "[REDACTED]"
# Shorter values could match ordinary words of a message.
_MIN_REDACT_LENGTH = 8


class RecgwError(Exception):
    """The gateway (or the channel) refused or failed a call.

    ``code`` is the ``grpc.StatusCode``, ``message`` the gateway's explanation.
    ``upload_id`` is set for upload errors (the client chooses every upload's
    id), so that the upload can be inspected or aborted later. ``attempts`` is
    the number of streams an upload opened before it gave up (1 for every
    other call).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        upload_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.upload_id = upload_id
        self.attempts = attempts

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"RecgwError(code={self.code!r}, message={self.message!r})"

    @classmethod
    def from_status(
        cls,
        code: grpc.StatusCode,
        message: str,
        *,
        upload_id: str | None = None,
        secrets: tuple[str, ...] = (),
    ) -> RecgwError:
        """An error for a status; any of ``secrets`` in the message is redacted."""
        for secret in secrets:
            if len(secret) >= _MIN_REDACT_LENGTH:
                message = message.replace(secret, _REDACTED)
        return cls(code, message, upload_id=upload_id)

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
            error.code(), error.details() or "", upload_id=upload_id, secrets=secrets
        )
