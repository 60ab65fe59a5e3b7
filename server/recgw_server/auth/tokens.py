"""Bearer-token authentication and role checks for every RPC."""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from recgw_server.api.errors import error_trailers
from recgw_server.domain import Reason


class Role(enum.Enum):
    UPLOADER = "uploader"
    ADMIN = "admin"


# Services reachable without a token: health checks (and reflection, when switched on).
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
SERVICE_ROLES = {
    "recgw.v1.UploadService": Role.UPLOADER,
    "recgw.v1.CredentialsService": Role.ADMIN,
}


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is configured."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: Role
    sha256_hex: str


class TokenVerifier:
    """Looks a presented token up among configured SHA-256 hashes, in constant time."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256_hex), e) for e in entries]

    def verify(self, token: str) -> TokenEntry | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: TokenEntry | None = None
        # Compare against every entry, without stopping at a match, so timing tells nothing.
        for expected, entry in self._entries:
            if hmac.compare_digest(digest, expected):
                found = entry
        return found


def _bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _denying_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str, reason: Reason
) -> grpc.RpcMethodHandler[Any, Any]:
    trailers = error_trailers(code, message, reason)

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message, trailing_metadata=trailers)

    async def deny_stream(
        request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await context.abort(code, message, trailing_metadata=trailers)

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_stream, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_unary, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(deny_unary, deserializer, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token; PERMISSION_DENIED with a token of the wrong role."""

    def __init__(self, verifier: TokenVerifier, on_denied: Callable[[str], None] | None = None):
        self._verifier = verifier
        self._on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        handler = await continuation(handler_call_details)
        if handler is None or service in PUBLIC_SERVICES:
            return handler
        required = SERVICE_ROLES.get(service)
        token = _bearer_token(handler_call_details.invocation_metadata or ())
        entry = self._verifier.verify(token) if token is not None else None
        if entry is None:
            code, reason, message = (
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.TOKEN_INVALID,
                "missing or unknown bearer token; send metadata 'authorization: Bearer <token>'",
            )
        elif required is None or entry.role is not required:
            needed = required.value if required else "none"
            code, reason, message = (
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.ROLE_NOT_ALLOWED,
                f"token '{entry.name}' has role '{entry.role.value}'; {method} needs role "
                f"'{needed}'",
            )
        else:
            return handler
        if self._on_denied is not None:
            self._on_denied(code.name)
        return _denying_handler(handler, code, message, reason)
