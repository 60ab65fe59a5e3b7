"""Gateway configuration: a TOML file, overridden by RECGW_* environment variables.

Nested settings use `__` in environment variables, for example
`RECGW_VAULT__READER__SECRET_ID` or `RECGW_UPLOADS__PART_SIZE_MIB=16`.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from recgw_server.auth.tokens import (
    Role,
    TenantScope,
    TokenEntry,
    check_tenant_pattern,
    parse_client_identity,
)
from recgw_server.domain import TENANT_ID_PATTERN


class TokenSetting(BaseModel):
    """Who may call: a bearer token (by its SHA-256, never its value), a client certificate
    identity, or both, with a role and the tenants it may act for."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    role: Role
    # SHA-256 hex digest of the token; empty: a client certificate alone stands in for a token.
    sha256: str = ""
    # "dns:NAME", "uri:URI" or "cn:NAME" of a client certificate (mTLS). With sha256 set, the
    # token is only accepted together with a certificate carrying this identity.
    client_identity: str = ""
    # Tenant ids or patterns with '*' ("acme", "acme-*"); ["*"] for all, which must be written.
    tenants: list[str]
    # Rate of new streams and unary calls for this token; unset: [limits] defaults.
    calls_per_second: float | None = Field(None, ge=0)
    burst: int | None = Field(None, ge=1)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError("sha256 must be 64 hex digits: the SHA-256 of the token")
        return value

    @field_validator("client_identity")
    @classmethod
    def _identity(cls, value: str) -> str:
        if value:
            parse_client_identity(value)
        return value

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                'list the tenant ids or patterns this token may act for; write ["*"] for all'
            )
        for pattern in value:
            check_tenant_pattern(pattern)
        return value

    @model_validator(mode="after")
    def _credential(self) -> TokenSetting:
        if not self.sha256 and not self.client_identity:
            raise ValueError("needs sha256 (a bearer token), client_identity (mTLS), or both")
        return self

    def entry(self, limits: LimitsSetting | None = None) -> TokenEntry:
        limits = limits or LimitsSetting()
        rate = (
            limits.token_calls_per_second
            if self.calls_per_second is None
            else (self.calls_per_second)
        )
        burst = self.burst or limits.token_burst or max(1, math.ceil(2 * rate))
        return TokenEntry(
            self.name,
            self.role,
            self.sha256,
            client_identity=self.client_identity,
            tenants=TenantScope(tuple(self.tenants)),
            calls_per_second=rate,
            burst=burst,
        )


class TlsSetting(BaseModel):
    """TLS for the gRPC port (and the metrics port with metrics_tls); files are re-read when
    they change, so certificates rotate without a restart."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path  # PEM certificate chain, leaf first
    key_file: Path  # PEM private key of the leaf
    # PEM CA bundle: when set, every client must present a certificate it signed (mTLS).
    client_ca_file: Path | None = None


class LimitsSetting(BaseModel):
    """Limits that keep one tenant or token from starving the others; 0 turns a limit off."""

    model_config = ConfigDict(extra="forbid")

    # Concurrent Upload streams per tenant, and per-tenant exceptions to it.
    max_uploads_per_tenant: int = Field(0, ge=0)
    tenant_max_uploads: dict[str, int] = Field(default_factory=dict)
    # Default rate of new streams and unary calls per token (a token's own setting wins).
    token_calls_per_second: float = Field(0, ge=0)
    token_burst: int = Field(0, ge=0)  # 0: twice the rate

    @field_validator("tenant_max_uploads")
    @classmethod
    def _tenant_ids(cls, value: dict[str, int]) -> dict[str, int]:
        for tenant_id, limit in value.items():
            if not TENANT_ID_PATTERN.fullmatch(tenant_id):
                raise ValueError("keys must be tenant ids")
            if limit < 0:
                raise ValueError("limits must be 0 (no limit) or more")
        return value

    def max_uploads(self, tenant_id: str) -> int:
        return self.tenant_max_uploads.get(tenant_id, self.max_uploads_per_tenant)


class AuditSetting(BaseModel):
    """Where the audit trail of credential changes goes: JSON lines, append-only."""

    model_config = ConfigDict(extra="forbid")

    # "stdout", or the path of a file that is only ever appended to; "" turns auditing off.
    sink: str = "stdout"


class VaultAuthSetting(BaseModel):
    """How one Vault identity logs in: a token (development) or AppRole (production)."""

    method: Literal["token", "approle"] = "approle"
    token: SecretStr | None = None
    role_id: str = ""
    secret_id: SecretStr | None = None
    mount_point: str = "approle"

    @model_validator(mode="after")
    def _complete(self) -> VaultAuthSetting:
        if self.method == "token" and not self.token:
            raise ValueError("method 'token' needs a token")
        if self.method == "approle" and not (self.role_id and self.secret_id):
            raise ValueError("method 'approle' needs role_id and secret_id")
        return self


class VaultSetting(BaseModel):
    address: str = "http://127.0.0.1:8200"
    kv_mount: str = "secret"
    base_path: str = "recgw/tenants"
    timeout_seconds: float = 5.0
    cache_ttl_seconds: float = 60.0
    # Identity for SetCredentials/Describe/Delete: may write, never read the secret.
    writer: VaultAuthSetting
    # Identity for the upload path: may read the secret.
    reader: VaultAuthSetting


class UploadsSetting(BaseModel):
    part_size_mib: int = Field(8, ge=5, le=5120)
    # With an unknown length the part size doubles every this many parts.
    growth_interval_parts: int = Field(1000, ge=1, le=10_000)
    # Open uploads idle this long expire (AbortMultipartUpload is tried).
    idle_timeout_seconds: float = Field(24 * 3600, gt=0)
    expiry_check_seconds: float = Field(300, gt=0)
    max_inflight_parts: int = Field(4, ge=1, le=64)
    memory_budget_mib: int = Field(512, ge=5)
    max_message_mib: int = Field(4, ge=1, le=64)


class S3Setting(BaseModel):
    max_attempts: int = Field(5, ge=1, le=20)
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 60.0
    io_threads: int = Field(32, ge=1, le=512)
    # Whole-object CRC32C on CompleteMultipartUpload; off for stores that lack it.
    full_object_checksum: bool = True


class Settings(BaseSettings):
    """Everything `recgw serve` needs."""

    model_config = SettingsConfigDict(
        env_prefix="RECGW_", env_nested_delimiter="__", extra="forbid"
    )

    listen: str = "127.0.0.1:50051"
    # TLS for the gRPC port; without it the gateway only starts with plaintext = true.
    tls: TlsSetting | None = None
    plaintext: bool = False
    metrics_listen: str = ""  # host:port for Prometheus; empty turns it off
    metrics_tls: bool = False  # serve metrics over HTTPS with [tls]'s certificate and key
    reflection: bool = False
    shutdown_grace_seconds: float = 30.0
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line
    # How often the config file (tokens, limits) and the metrics certificate are checked for
    # changes; SIGHUP reloads at once. 0 turns the file watch off.
    reload_check_seconds: float = Field(5.0, ge=0)
    # Where the embedded session store (SQLite) lives; keep it on durable storage.
    data_dir: Path = Path("recgw-data")
    tokens: list[TokenSetting] = Field(default_factory=list)
    limits: LimitsSetting = Field(default_factory=lambda: LimitsSetting())
    audit: AuditSetting = Field(default_factory=lambda: AuditSetting())
    vault: VaultSetting
    uploads: UploadsSetting = Field(default_factory=lambda: UploadsSetting())
    s3: S3Setting = Field(default_factory=lambda: S3Setting())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.tls is None and not self.plaintext:
            raise ValueError(
                "no [tls] section: set tls.cert_file and tls.key_file, or plaintext = true to "
                "listen without TLS (loopback or behind a TLS-terminating proxy only)"
            )
        if self.tls is not None and self.plaintext:
            raise ValueError("plaintext = true and a [tls] section exclude each other")
        if self.metrics_tls and self.tls is None:
            raise ValueError("metrics_tls needs a [tls] section (its certificate and key)")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique")
        mtls = self.tls is not None and self.tls.client_ca_file is not None
        if any(t.client_identity for t in self.tokens) and not mtls:
            raise ValueError("tokens with client_identity need tls.client_ca_file (mTLS)")
        alone = [t.client_identity for t in self.tokens if t.client_identity and not t.sha256]
        if len(set(alone)) != len(alone):
            raise ValueError("two tokens without sha256 have the same client_identity")
        return self

    def token_entries(self) -> list[TokenEntry]:
        return [t.entry(self.limits) for t in self.tokens]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then RECGW_* variables, then the TOML file.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


class ConfigError(Exception):
    """The configuration is invalid; the message names fields, never their values."""


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Read the TOML file (if any), then apply RECGW_* environment overrides."""

    class FileSettings(Settings):
        model_config = SettingsConfigDict(
            env_prefix="RECGW_", env_nested_delimiter="__", extra="forbid", toml_file=config_file
        )

    try:
        return FileSettings(**overrides)  # type: ignore[arg-type]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"invalid configuration: {config_file} is not valid TOML ({exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"invalid configuration: cannot read {config_file} ({exc.strerror})"
        ) from None
    except ValidationError as exc:
        # pydantic's own text repeats the input values, which may hold secrets.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
