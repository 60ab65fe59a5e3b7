"""Authentication, role and rate checks for every RPC, before any request body is parsed.

The interceptor hands gRPC a handler whose request deserializer is the identity, so a message
is only decoded after its caller passed; undecodable bytes then get INVALID_ARGUMENT. The
caller of a call is available to the services through `current_caller()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from recgw_server.api.errors import Context, abort_with
from recgw_server.audit import AuditLog
from recgw_server.auth.certs import peer_identities
from recgw_server.auth.tokens import Role, TokenEntry, TokenVerifier
from recgw_server.domain import ErrorKind, Reason, RecgwError, quote_client
from recgw_server.metrics import GatewayMetrics

log = logging.getLogger(__name__)

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
CREDENTIALS_SERVICE = "recgw.v1.CredentialsService"
# The audit trail's name for each credentials RPC.
CREDENTIALS_OPERATIONS = {
    "SetCredentials": "set",
    "DescribeCredentials": "describe",
    "DeleteCredentials": "delete",
    "VerifyCredentials": "verify",
}


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the configured credential and how it was presented."""

    entry: TokenEntry
    certificate: str = ""  # the client certificate identity that matched, if one had to

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> str:
        if not self.entry.sha256_hex:
            return "certificate"
        return "token+certificate" if self.entry.client_identity else "token"

    def may_act_for(self, tenant_id: str) -> bool:
        return self.entry.tenants.allows(tenant_id)

    def require_tenant(self, tenant_id: str) -> None:
        """PERMISSION_DENIED (TENANT_NOT_ALLOWED) unless this caller may act for the tenant."""
        if not self.may_act_for(tenant_id):
            raise RecgwError(
                ErrorKind.PERMISSION_DENIED,
                f"'{self.name}' may not act for tenant {quote_client(tenant_id, 64)}; the "
                "operator lists the tenants of each token in its 'tenants' setting",
                reason=Reason.TENANT_NOT_ALLOWED,
                details={"tenant_id": tenant_id[:64]},
            )

    def audit_fields(self) -> dict[str, str]:
        return {"caller": self.name, "caller_kind": self.kind, "certificate": self.certificate}


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("recgw_caller")


def current_caller() -> Caller:
    """The authenticated caller of the RPC being handled."""
    return _CALLER.get()


class TokenBucket:
    """`rate` calls per second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self) -> float:
        """0 if a call may go ahead now, else the seconds until one may."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


@dataclass(eq=False)
class _RunningStream:
    grant: tuple[object, ...]
    name: str
    revoked: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class ReloadReport:
    added: list[str]
    removed: list[str]
    changed: list[str]
    streams_ended: int


class Authenticator:
    """The credentials in force, replaceable at run time; ends streams whose grant is gone."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self._verifier = TokenVerifier(entries)
        self._buckets: dict[str, TokenBucket] = {}
        self._streams: set[_RunningStream] = set()

    @property
    def entries(self) -> list[TokenEntry]:
        return self._verifier.entries

    def replace(self, entries: Sequence[TokenEntry]) -> ReloadReport:
        """Put new credentials in force; streams admitted by a removed or changed one end."""
        old = {e.name: e for e in self._verifier.entries}
        new = {e.name: e for e in entries}
        self._verifier = TokenVerifier(entries)
        grants = self._verifier.grants()
        ended = 0
        for stream in list(self._streams):
            if stream.grant not in grants and not stream.revoked.is_set():
                stream.revoked.set()
                ended += 1
        for name, entry in new.items():
            bucket = self._buckets.get(name)
            if bucket and (bucket.rate, bucket.burst) != (entry.calls_per_second, entry.burst):
                del self._buckets[name]
        for name in set(self._buckets) - set(new):
            del self._buckets[name]
        return ReloadReport(
            added=sorted(set(new) - set(old)),
            removed=sorted(set(old) - set(new)),
            changed=sorted(n for n in set(old) & set(new) if old[n] != new[n]),
            streams_ended=ended,
        )

    def authenticate(
        self, token: str | None, certificate_identities: Sequence[str]
    ) -> Caller | RecgwError:
        if token is not None:
            entry = self._verifier.verify(token)
            if entry is None:
                return RecgwError(
                    ErrorKind.UNAUTHENTICATED,
                    "unknown bearer token; send metadata 'authorization: Bearer <token>' with a "
                    "configured token",
                    reason=Reason.TOKEN_INVALID,
                )
            if entry.client_identity:
                if entry.client_identity not in certificate_identities:
                    return RecgwError(
                        ErrorKind.UNAUTHENTICATED,
                        f"token '{entry.name}' is only accepted together with a client "
                        f"certificate for {quote_client(entry.client_identity)}; this "
                        "connection's certificate is not one",
                        reason=Reason.TOKEN_INVALID,
                    )
                return Caller(entry, entry.client_identity)
            return Caller(entry)
        entry = self._verifier.by_certificate(certificate_identities)
        if entry is not None:
            return Caller(entry, entry.client_identity)
        return RecgwError(
            ErrorKind.UNAUTHENTICATED,
            "missing bearer token; send metadata 'authorization: Bearer <token>'"
            + (
                "; this client certificate is no configured identity"
                if certificate_identities
                else ""
            ),
            reason=Reason.TOKEN_INVALID,
        )

    def check_rate(self, entry: TokenEntry) -> RecgwError | None:
        if entry.calls_per_second <= 0:
            return None
        bucket = self._buckets.get(entry.name)
        if bucket is None:
            bucket = self._buckets[entry.name] = TokenBucket(entry.calls_per_second, entry.burst)
        wait = bucket.take()
        if wait <= 0:
            return None
        return RecgwError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"'{entry.name}' is over its limit of {entry.calls_per_second:g} new calls per "
            f"second (burst {entry.burst}); retry in {wait:.2f} s",
            reason=Reason.RATE_LIMITED,
            details={
                "limit": "calls_per_second",
                "limit_value": f"{entry.calls_per_second:g}",
                "burst": str(entry.burst),
                "retry_after_seconds": f"{wait:.3f}",
            },
        )

    @contextlib.contextmanager
    def running(self, caller: Caller) -> Iterator[asyncio.Event]:
        """Track a stream for the time it runs; the event is set when its grant is revoked."""
        stream = _RunningStream(caller.entry.grant(), caller.name)
        self._streams.add(stream)
        try:
            yield stream.revoked
        finally:
            self._streams.discard(stream)


def _bearer_token(metadata: Sequence[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # present but unusable: unknown, not missing
    return None


def _decoder(
    deserializer: Callable[[bytes], Any] | None, parse: Callable[[bytes], Any] | None = None
) -> Callable[[bytes, int], Any]:
    """Decodes with `parse` if given (a faster parser of the same messages), else with the
    handler's `deserializer`; undecodable bytes become INVALID_ARGUMENT."""
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(message_type, "full_name", "the request type")
    deserializer = parse or deserializer

    def decode(raw: bytes, index: int) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception:  # protobuf's DecodeError, or anything a broken message trips
            which = f"message {index + 1} of the stream" if index >= 0 else "the request"
            raise RecgwError(
                ErrorKind.INVALID_ARGUMENT,
                f"{which} is not a valid {type_name} ({len(raw)} bytes that protobuf cannot "
                "decode); check that the client sends messages of the gateway's protos",
                reason=Reason.MESSAGE_UNDECODABLE,
            ) from None

    return decode


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known credential, PERMISSION_DENIED for the wrong role,
    RESOURCE_EXHAUSTED over the rate limit; all before the request body is parsed."""

    def __init__(
        self,
        authenticator: Authenticator,
        metrics: GatewayMetrics,
        audit: AuditLog | None = None,
        parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
    ) -> None:
        """`parsers`: by full method name, a request parser to use instead of the handler's
        deserializer (the upload stream's zero-copy one)."""
        self._auth = authenticator
        self._metrics = metrics
        self._audit = audit
        self._parsers = dict(parsers or {})

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
        metadata = tuple(handler_call_details.invocation_metadata or ())
        return self._guarded(handler, method, service, metadata)

    async def _admit(
        self, method: str, service: str, metadata: Sequence[tuple[str, Any]], context: Context
    ) -> Caller:
        """The caller, or the call ends here (with an audit record for credentials RPCs)."""
        identities = peer_identities(context.auth_context())
        outcome = self._auth.authenticate(_bearer_token(metadata), identities)
        caller = outcome if isinstance(outcome, Caller) else None
        error = outcome if isinstance(outcome, RecgwError) else None
        required = SERVICE_ROLES.get(service)
        if caller is not None and (required is None or caller.entry.role is not required):
            error = RecgwError(
                ErrorKind.PERMISSION_DENIED,
                f"'{caller.name}' has role '{caller.entry.role.value}'; {method} needs role "
                f"'{required.value if required else 'none'}'",
                reason=Reason.ROLE_NOT_ALLOWED,
            )
        if error is None and caller is not None:
            error = self._auth.check_rate(caller.entry)
        if error is None and caller is not None:
            return caller
        assert error is not None
        if service == CREDENTIALS_SERVICE and self._audit is not None:
            await self._audit.record(
                event="credentials",
                operation=CREDENTIALS_OPERATIONS.get(method.rsplit("/", 1)[-1], method),
                outcome="denied",
                code=error.kind.name,
                reason=error.reason.value,
                message=error.message,
                peer=context.peer(),
                tenant_id="",  # the body of a refused call is never parsed
                **(caller.audit_fields() if caller else {"caller": "", "caller_kind": ""}),
            )
        await abort_with(context, self._metrics, error)

    def _guarded(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        method: str,
        service: str,
        metadata: Sequence[tuple[str, Any]],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decode = _decoder(handler.request_deserializer, self._parsers.get(method))
        serializer = handler.response_serializer
        metrics = self._metrics

        async def decoded(context: Context) -> AsyncIterator[Any]:
            # Reads with context.read(), not gRPC's request iterator: that iterator keeps the
            # last message it yielded, so a stream waiting for memory would still hold a
            # message's bytes the pipeline has already spilled or sent (outside the budget).
            index = 0
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return
                parsed = [decode(raw, index)]
                del raw
                index += 1
                yield parsed.pop()

        async def unary_request(raw: bytes, context: Context) -> Any:
            caller = await self._admit(method, service, metadata, context)
            try:
                request = decode(raw, -1)
            except RecgwError as error:
                await abort_with(context, metrics, error)
            _CALLER.set(caller)
            return request

        if not handler.request_streaming and not handler.response_streaming:
            unary_unary: Any = handler.unary_unary

            async def guarded_unary_unary(raw: bytes, context: Context) -> Any:
                request = await unary_request(raw, context)
                return await unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, None, serializer)

        if not handler.request_streaming:
            unary_stream: Any = handler.unary_stream

            async def guarded_unary_stream(raw: bytes, context: Context) -> AsyncIterator[Any]:
                request = await unary_request(raw, context)
                async for response in unary_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, None, serializer)

        if not handler.response_streaming:
            stream_unary: Any = handler.stream_unary

            async def guarded_stream_unary(
                raw_messages: AsyncIterator[bytes], context: Context
            ) -> Any:
                caller = await self._admit(method, service, metadata, context)
                _CALLER.set(caller)
                with self._auth.running(caller) as revoked:
                    return await self._until_revoked(
                        stream_unary(decoded(context), context), revoked, caller, context
                    )

            return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, None, serializer)

        stream_stream: Any = handler.stream_stream

        async def guarded_stream_stream(
            raw_messages: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[Any]:
            # Response streams (reflection only, which is public) are not ended on revocation.
            caller = await self._admit(method, service, metadata, context)
            _CALLER.set(caller)
            async for response in stream_stream(decoded(context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, None, serializer)

    async def _until_revoked(
        self, call: Awaitable[Any], revoked: asyncio.Event, caller: Caller, context: Context
    ) -> Any:
        """Run a stream's handler; end it cleanly if its credential is revoked meanwhile."""
        task = asyncio.ensure_future(call)
        watch = asyncio.ensure_future(revoked.wait())
        revoked_first = False
        try:
            done, _ = await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
            revoked_first = task not in done
        finally:
            watch.cancel()
            if not task.done():
                # Revoked, or this handler itself was cancelled: the handler cleans up as for
                # a lost connection (the upload stays resumable).
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not revoked_first:
            return task.result()
        log.info("ending a stream of '%s': its credential was revoked or changed", caller.name)
        await abort_with(
            context,
            self._metrics,
            RecgwError(
                ErrorKind.UNAUTHENTICATED,
                f"the credential '{caller.name}' was revoked or changed while this stream ran; "
                "the upload stays open: resume it with a valid token",
                reason=Reason.TOKEN_INVALID,
            ),
        )
