"""Errors on the wire: a status code, a message for people, and an ErrorInfo for programs."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2

from recgw_server.domain import ErrorKind, Reason, RecgwError
from recgw_server.metrics import GatewayMetrics

log = logging.getLogger(__name__)

ERROR_DOMAIN = "recgw.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

STATUS_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

Context = grpc.aio.ServicerContext[Any, Any]


def error_trailers(
    code: grpc.StatusCode, message: str, reason: Reason, details: dict[str, str] | None = None
) -> tuple[tuple[str, bytes], ...]:
    """The `grpc-status-details-bin` trailer: a google.rpc.Status holding one ErrorInfo."""
    info = error_details_pb2.ErrorInfo(
        reason=reason.value, domain=ERROR_DOMAIN, metadata=dict(details or {})
    )
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


async def abort_with(context: Context, metrics: GatewayMetrics, error: RecgwError) -> NoReturn:
    """End the call with `error`'s status code, message and ErrorInfo."""
    code = STATUS_CODES[error.kind]
    metrics.rpc_errors.labels(code.name).inc()
    log.info("%s %s: %s", code.name, error.reason.value, error.message)  # never holds secrets
    await context.abort(
        code,
        error.message,
        trailing_metadata=error_trailers(code, error.message, error.reason, error.details),
    )
    raise AssertionError("context.abort returned")  # pragma: no cover
