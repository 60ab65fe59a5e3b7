"""Role credentials: the gateway assumes a tenant's IAM role with sts:AssumeRole.

The gateway's own AWS identity (the one that calls AssumeRole) comes from botocore's standard
credential chain: environment variables, the shared config files, a container or pod role
(ECS task role, EKS IRSA / Pod Identity) or the EC2 instance role. No long-lived key of the
gateway needs to exist in the gateway's configuration.

Vault/OpenBao's AWS secrets engine is not offered as a source of that identity: OpenBao 2.x
ships no AWS secrets engine, and moto's trust check compares the caller's ARN literally, so the
sessions and users such an engine makes could not be tested either (README, "Onboarding").

Temporary credentials are botocore RefreshableCredentials: every request signs with the current
ones, and once less than `refresh_ahead_seconds` of a session is left one caller refreshes them
while the others keep signing with the old ones; in the last half of that window every caller
waits for the refresh. So a multi-hour upload never sends a part with an expired session.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.session

from recgw_server.domain import (
    ErrorKind,
    Reason,
    RecgwError,
    TenantCredentials,
    role_session_name,
)

log = logging.getLogger(__name__)

ASSUME_ROLE = "AssumeRole"
_GATEWAY_REJECTED = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "IncompleteSignature",
}
_STS_UNAVAILABLE = {"Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}


@dataclass(frozen=True)
class RoleSettings:
    """How the gateway assumes tenant roles."""

    # Session length asked of STS; at most the role's MaxSessionDuration (default 1 h).
    session_duration_seconds: int = 3600
    # Refresh once less than this is left of a session (must be below the session duration).
    refresh_ahead_seconds: float = 600.0
    # STS endpoint; empty: AWS's regional endpoint of `sts_region`.
    sts_endpoint_url: str = ""
    sts_region: str = "us-east-1"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    # The gateway's principal ARN, shown to customers for their trust policy; informative only.
    gateway_principal_arn: str = ""


class _FixedCredentialProvider(botocore.credentials.CredentialProvider):
    """Hands one credentials object to a botocore session, in place of the standard chain."""

    METHOD = "recgw-assume-role"

    def __init__(self, credentials: botocore.credentials.Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> botocore.credentials.Credentials:
        return self._credentials


def session_with(credentials: botocore.credentials.Credentials) -> boto3.session.Session:
    """A boto3 session whose clients sign with `credentials` (refreshable ones stay so)."""
    core = botocore.session.Session()
    core.register_component(
        "credential_provider",
        botocore.credentials.CredentialResolver(providers=[_FixedCredentialProvider(credentials)]),
    )
    return boto3.session.Session(botocore_session=core)


def _expiry_text(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


class RoleAssumer:
    """Assumes tenant roles with the gateway's own identity; thread-safe, blocking (run it in
    worker threads)."""

    def __init__(
        self, settings: RoleSettings | None = None, session: boto3.session.Session | None = None
    ) -> None:
        self.settings = settings or RoleSettings()
        if self.settings.refresh_ahead_seconds >= self.settings.session_duration_seconds:
            raise ValueError("refresh_ahead_seconds must be shorter than the session duration")
        self._session = session
        self._sts: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        with self._lock:  # boto3 sessions are not thread-safe while they create clients
            if self._sts is None:
                session = self._session or boto3.session.Session()
                self._sts = session.client(
                    "sts",
                    region_name=self.settings.sts_region,
                    endpoint_url=self.settings.sts_endpoint_url or None,
                    config=botocore.config.Config(
                        retries={"mode": "standard", "max_attempts": self.settings.max_attempts},
                        connect_timeout=self.settings.connect_timeout,
                        read_timeout=self.settings.read_timeout,
                    ),
                )
            return self._sts

    def assume(self, credentials: TenantCredentials) -> dict[str, str]:
        """One AssumeRole for the tenant: botocore's credential metadata, or RecgwError."""
        tenant_id = credentials.tenant_id
        error: RecgwError | None = None
        try:
            response = self._client().assume_role(
                RoleArn=credentials.role_arn,
                RoleSessionName=role_session_name(tenant_id),
                ExternalId=credentials.external_id,
                DurationSeconds=self.settings.session_duration_seconds,
            )
        except botocore.exceptions.ClientError as exc:
            error = self._translate_client_error(credentials, exc)
        except botocore.exceptions.NoCredentialsError:
            error = RecgwError(
                ErrorKind.INTERNAL,
                "the gateway has no AWS identity to assume the tenant's role with: give it one "
                "through the standard AWS credential chain (environment, instance or pod role) "
                "(server misconfiguration)",
                details={"operation": ASSUME_ROLE, "store_code": "NoCredentials"},
            )
        except botocore.exceptions.BotoCoreError as exc:
            error = RecgwError(
                ErrorKind.UNAVAILABLE,
                f"cannot reach STS to assume the role of tenant '{tenant_id}' "
                f"({type(exc).__name__}); retry later",
                reason=Reason.STORAGE_UNAVAILABLE,
                details={"operation": ASSUME_ROLE, "store_code": type(exc).__name__},
            )
        if error is not None:
            error.store_code = error.details.get("store_code", "")
            log.warning("AssumeRole for tenant %s failed: %s", tenant_id, error.message)
            raise error
        issued = response["Credentials"]
        log.info(
            "assumed role %s for tenant %s until %s",
            credentials.role_arn,
            tenant_id,
            _expiry_text(issued["Expiration"]),
        )
        return {
            "access_key": issued["AccessKeyId"],
            "secret_key": issued["SecretAccessKey"],
            "token": issued["SessionToken"],
            "expiry_time": _expiry_text(issued["Expiration"]),
        }

    def _translate_client_error(
        self, credentials: TenantCredentials, exc: botocore.exceptions.ClientError
    ) -> RecgwError:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        facts = {"operation": ASSUME_ROLE, "store_code": code}
        if code == "AccessDenied":
            return RecgwError(
                ErrorKind.PERMISSION_DENIED,
                f"STS denied assuming role '{credentials.role_arn}' (AccessDenied): its trust "
                "policy must allow the gateway's principal with sts:ExternalId "
                f"'{credentials.external_id}' (recgw policy --role prints it)",
                reason=Reason.ACCESS_DENIED,
                details={
                    **facts,
                    "missing_permission": f"sts:AssumeRole on {credentials.role_arn}",
                },
            )
        if code in _GATEWAY_REJECTED:
            return RecgwError(
                ErrorKind.INTERNAL,
                f"STS rejected the gateway's own AWS identity ({code}); fix the gateway's AWS "
                "credentials (server misconfiguration)",
                details=facts,
            )
        if code in _STS_UNAVAILABLE or status >= 500:
            return RecgwError(
                ErrorKind.UNAVAILABLE,
                f"STS is unavailable or throttling ({code}); retry later",
                reason=Reason.STORAGE_UNAVAILABLE,
                details=facts,
            )
        return RecgwError(
            ErrorKind.FAILED_PRECONDITION,
            f"STS refused assuming role '{credentials.role_arn}' ({code}); check the role ARN, "
            "that the role exists and that its maximum session duration is at least "
            f"{self.settings.session_duration_seconds} s",
            reason=Reason.STORAGE_REJECTED,
            details=facts,
        )

    def credentials_for(
        self, credentials: TenantCredentials
    ) -> botocore.credentials.RefreshableCredentials:
        """Refreshable credentials of the tenant's role; the first AssumeRole happens now."""
        ahead = self.settings.refresh_ahead_seconds
        return botocore.credentials.RefreshableCredentials.create_from_metadata(
            metadata=self.assume(credentials),
            refresh_using=lambda: self.assume(credentials),
            method=_FixedCredentialProvider.METHOD,
            # botocore compares these with float seconds; its stubs say int
            advisory_timeout=ahead,  # type: ignore[arg-type]
            mandatory_timeout=ahead / 2,  # type: ignore[arg-type]
        )

    def session_for(self, credentials: TenantCredentials) -> boto3.session.Session:
        """A boto3 session signing as the tenant's role, refreshing before sessions expire."""
        return session_with(self.credentials_for(credentials))
