"""CredentialsService: store, describe, verify and delete a tenant's S3 credentials."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal

import grpc
from recgw.v1 import credentials_pb2, credentials_pb2_grpc

from recgw_client._channel import (
    DEFAULT_TIMEOUT,
    ChannelOrTarget,
    TlsConfig,
    bearer_metadata,
    open_channel,
)
from recgw_client.errors import RecgwError

__all__ = [
    "AbandonedUploads",
    "CredentialsAdmin",
    "CredentialsView",
    "ServerSideEncryption",
    "StorageTarget",
    "VerifyCheck",
    "VerifyResult",
]

ServerSideEncryption = Literal["AES256", "aws:kms"]
"""SSE-S3 or SSE-KMS; None means the bucket's default."""

AbandonedUploads = Literal["abort", "salvage"]
"""What happens to an upload whose writer never comes back: nothing visible, or the
recorded bytes kept as the object (see AbandonedUploadPolicy in the protos)."""

_POLICY_TO_PROTO: dict[str | None, credentials_pb2.AbandonedUploadPolicy] = {
    None: credentials_pb2.ABANDONED_UPLOAD_POLICY_UNSPECIFIED,
    "abort": credentials_pb2.ABANDONED_UPLOAD_POLICY_ABORT,
    "salvage": credentials_pb2.ABANDONED_UPLOAD_POLICY_SALVAGE,
}
_PROTO_TO_POLICY: dict[int, AbandonedUploads] = {
    credentials_pb2.ABANDONED_UPLOAD_POLICY_UNSPECIFIED: "abort",
    credentials_pb2.ABANDONED_UPLOAD_POLICY_ABORT: "abort",
    credentials_pb2.ABANDONED_UPLOAD_POLICY_SALVAGE: "salvage",
}

_Mode = credentials_pb2.ServerSideEncryptionMode
_SSE_TO_MODE: dict[str | None, _Mode] = {
    None: credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_UNSPECIFIED,
    "AES256": credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3,
    "aws:kms": credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS,
}
_MODE_TO_SSE: dict[int, ServerSideEncryption] = {
    credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_S3: "AES256",
    credentials_pb2.SERVER_SIDE_ENCRYPTION_MODE_KMS: "aws:kms",
}
_CHECK_RESULTS = {
    credentials_pb2.CREDENTIALS_CHECK_RESULT_PASSED: "passed",
    credentials_pb2.CREDENTIALS_CHECK_RESULT_FAILED: "failed",
    credentials_pb2.CREDENTIALS_CHECK_RESULT_SKIPPED: "skipped",
}


@dataclass(frozen=True)
class StorageTarget:
    """Where and how a tenant's objects are written (no secret)."""

    region: str
    bucket: str
    prefix: str
    endpoint_url: str
    force_path_style: bool
    sse: ServerSideEncryption | None
    kms_key_id: str
    allow_overwrite: bool
    equal_part_sizes: bool
    expected_bucket_owner: str = ""
    abandoned_uploads: AbandonedUploads = "abort"


@dataclass(frozen=True)
class CredentialsView:
    """The non-secret view of stored credentials; the access key id is masked.

    With a role: `role_arn`, and the `external_id` and `trusted_principal` its trust policy
    must name.
    """

    tenant_id: str
    version: int
    update_time: datetime | None
    access_key_id_hint: str
    target: StorageTarget
    role_arn: str = ""
    external_id: str = ""
    trusted_principal: str = ""


@dataclass(frozen=True)
class VerifyCheck:
    """One check of the setup doctor: `result` is "passed", "failed" or "skipped"."""

    name: str
    result: str
    operation: str
    error_code: str
    missing_permission: str
    fix: str
    detail: str


@dataclass(frozen=True)
class VerifyResult:
    """The setup doctor's report: each check, and the first failure's code and fix."""

    ok: bool
    key: str
    error_code: str
    error_message: str
    checks: tuple[VerifyCheck, ...] = ()
    bucket_region: str = ""


def _view(message: credentials_pb2.CredentialsView) -> CredentialsView:
    target = message.target
    return CredentialsView(
        tenant_id=message.tenant_id,
        version=message.version,
        update_time=(
            message.update_time.ToDatetime(tzinfo=UTC) if message.HasField("update_time") else None
        ),
        access_key_id_hint=message.access_key_id_hint,
        target=StorageTarget(
            region=target.region,
            bucket=target.bucket,
            prefix=target.prefix,
            endpoint_url=target.endpoint_url,
            force_path_style=target.force_path_style,
            sse=_MODE_TO_SSE.get(target.encryption.mode),
            kms_key_id=target.encryption.kms_key_id,
            allow_overwrite=target.allow_overwrite,
            equal_part_sizes=target.equal_part_sizes,
            expected_bucket_owner=target.expected_bucket_owner,
            abandoned_uploads=_PROTO_TO_POLICY.get(target.abandoned_uploads, "abort"),
        ),
        role_arn=message.role_arn,
        external_id=message.external_id,
        trusted_principal=message.trusted_principal,
    )


class CredentialsAdmin:
    """Client of CredentialsService; ``token`` is the bearer token of an ``admin``.

    ``channel_or_target`` is a ``grpc.aio.Channel`` (not closed by this client)
    or an address (a channel the client owns; ``tls``, ``plaintext`` and
    ``channel_credentials`` as for ``UploadClient``: plaintext by default only
    on loopback). No method returns a secret.
    """

    def __init__(
        self,
        channel_or_target: ChannelOrTarget,
        token: str,
        *,
        tls: TlsConfig | None = None,
        plaintext: bool | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._metadata = bearer_metadata(token)
        self._secrets: tuple[str, ...] = (token.strip(),)
        self._channel, self._owns_channel = open_channel(
            channel_or_target, tls=tls, plaintext=plaintext, credentials=channel_credentials
        )
        self._stub = credentials_pb2_grpc.CredentialsServiceStub(self._channel)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channel={self._channel!r})"

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> CredentialsAdmin:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _error(self, err: grpc.aio.AioRpcError, *extra_secrets: str) -> RecgwError:
        return RecgwError.from_rpc_error(err, secrets=(*self._secrets, *extra_secrets))

    async def set(
        self,
        tenant_id: str,
        access_key_id: str,
        secret_access_key: str | bytes | bytearray,
        region: str,
        bucket: str,
        *,
        prefix: str = "uploads/",
        endpoint_url: str = "",
        force_path_style: bool = False,
        sse: ServerSideEncryption | None = None,
        kms_key_id: str = "",
        allow_overwrite: bool = False,
        equal_part_sizes: bool = False,
        expected_bucket_owner: str = "",
        role_arn: str = "",
        rotate_external_id: bool = False,
        abandoned_uploads: AbandonedUploads | None = None,
    ) -> CredentialsView:
        """Create or overwrite the tenant's credentials; returns what was stored, without secret.

        With `role_arn` (and empty key id and secret) the gateway assumes that role instead;
        `region` may be empty to have it found from the bucket. The secret may be a
        ``bytearray`` (UTF-8) that the caller wipes afterwards; protobuf needs it as a
        ``str`` while the request is sent, and this method clears the request once the call
        has ended.
        """
        if sse not in _SSE_TO_MODE:
            raise ValueError("sse must be None, 'AES256' or 'aws:kms'")
        if abandoned_uploads not in _POLICY_TO_PROTO:
            raise ValueError("abandoned_uploads must be None, 'abort' or 'salvage'")
        secret = (
            secret_access_key
            if isinstance(secret_access_key, str)
            else bytes(secret_access_key).decode("utf-8")
        )
        request = credentials_pb2.SetCredentialsRequest(
            tenant_id=tenant_id,
            access_key_id=access_key_id,
            secret_access_key=secret,
            rotate_external_id=rotate_external_id,
            target=credentials_pb2.StorageTarget(
                region=region,
                bucket=bucket,
                prefix=prefix,
                endpoint_url=endpoint_url,
                force_path_style=force_path_style,
                encryption=credentials_pb2.ServerSideEncryption(
                    mode=_SSE_TO_MODE[sse], kms_key_id=kms_key_id
                ),
                allow_overwrite=allow_overwrite,
                equal_part_sizes=equal_part_sizes,
                expected_bucket_owner=expected_bucket_owner,
                abandoned_uploads=_POLICY_TO_PROTO[abandoned_uploads],
            ),
        )
        if role_arn:
            request.role.role_arn = role_arn
        try:
            response = await self._stub.SetCredentials(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            raise self._error(err, secret) from None
        finally:
            request.Clear()
        return _view(response.credentials)

    async def describe(self, tenant_id: str) -> CredentialsView:
        """The non-secret view; RecgwError NOT_FOUND when none are stored."""
        try:
            response = await self._stub.DescribeCredentials(
                credentials_pb2.DescribeCredentialsRequest(tenant_id=tenant_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        return _view(response.credentials)

    async def delete(self, tenant_id: str) -> None:
        """Remove the tenant's credentials, all versions."""
        try:
            await self._stub.DeleteCredentials(
                credentials_pb2.DeleteCredentialsRequest(tenant_id=tenant_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    async def verify(self, tenant_id: str) -> VerifyResult:
        """Write a tiny test object with the stored credentials."""
        try:
            response = await self._stub.VerifyCredentials(
                credentials_pb2.VerifyCredentialsRequest(tenant_id=tenant_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        return VerifyResult(
            ok=response.ok,
            key=response.key,
            error_code=response.error_code,
            error_message=response.error_message,
            checks=tuple(
                VerifyCheck(
                    name=check.name,
                    result=_CHECK_RESULTS.get(check.result, "unknown"),
                    operation=check.operation,
                    error_code=check.error_code,
                    missing_permission=check.missing_permission,
                    fix=check.fix,
                    detail=check.detail,
                )
                for check in response.checks
            ),
            bucket_region=response.bucket_region,
        )
