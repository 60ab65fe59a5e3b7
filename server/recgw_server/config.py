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
    # The most of the memory budget one tenant's buffers may hold; beyond it they spill to disk.
    tenant_memory_share: float = Field(0.5, gt=0, le=1)
    max_message_mib: int = Field(4, ge=1, le=64)
    # A part still filling after this long (a slow live call) moves to the spool disk.
    spill_after_seconds: float = Field(2.0, gt=0)
    # A new stream takes over an upload whose writer has sent nothing for this long.
    takeover_after_seconds: float = Field(5.0, gt=0)
    # "on_request": SHA-256 only for uploads whose start asks for it; "always": every upload.
    sha256: Literal["on_request", "always"] = "on_request"
    # How often the completion request is tried when S3 cannot be reached.
    completion_attempts: int = Field(5, ge=1, le=20)
    completion_backoff_seconds: float = Field(0.5, ge=0)


class SpoolSetting(BaseModel):
    """Local disk for the parts of slow streams (private files, deleted once in S3)."""

    # Default: `spool` under data_dir. Emptied at start-up.
    directory: Path | None = None
    disk_budget_mib: int = Field(16 * 1024, ge=1)
    # Encrypt spooled parts with a key that exists only in this process's memory.
    encrypt: bool = False


class WebhookEndpointSetting(BaseModel):
    url: str
    # Tenant ids or patterns (fnmatch) whose events this endpoint receives; "*" is all.
    tenants: list[str] = Field(default_factory=lambda: ["*"])

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("url must be an http(s) URL")
        return value


class EventsSetting(BaseModel):
    """Signed webhooks for upload outcomes (see events/webhooks.py)."""

    endpoints: list[WebhookEndpointSetting] = Field(default_factory=list)
    # The HMAC-SHA256 signing secret; set it in the environment (RECGW_EVENTS__SECRET).
    secret: SecretStr | None = None
    max_attempts: int = Field(12, ge=1, le=100)
    initial_backoff_seconds: float = Field(1.0, gt=0)
    max_backoff_seconds: float = Field(600.0, gt=0)
    poll_interval_seconds: float = Field(1.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)


class ServerSetting(BaseModel):
    """Transport settings of the gRPC server."""

    # HTTP/2 keepalive pings to clients: a connection whose peer does not answer within the
    # timeout is closed, which ends its streams (they stay resumable).
    keepalive_time_seconds: float = Field(10.0, gt=0)
    keepalive_timeout_seconds: float = Field(5.0, gt=0)
    # SO_REUSEPORT: several `recgw serve` workers on one machine bind the same `listen`
    # address and the kernel spreads connections across them. Needs PostgreSQL sessions and a
    # data_dir of its own per worker (the spool is emptied at start-up).
    reuse_port: bool = False
    # How long a new call may wait in gRPC until the event loop takes it
    # (grpc.server_max_unrequested_time_in_server). grpc.aio takes one new call per loop turn,
    # so a burst of hundreds of new streams beside busy ones can wait longer than gRPC's default
    # of 30 s, and gRPC then cancels them unseen; their clients were told INTERNAL.
    accept_wait_seconds: int = Field(300, ge=1)


class S3Setting(BaseModel):
    max_attempts: int = Field(5, ge=1, le=20)
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 60.0
    io_threads: int = Field(32, ge=1, le=512)
    # Whole-object CRC32C on CompleteMultipartUpload; off for stores that lack it.
    full_object_checksum: bool = True
    # `Expect: 100-continue` on writes: "auto" = on, except to loopback endpoints.
    expect_continue: Literal["auto", "on", "off"] = "auto"


class SessionsSetting(BaseModel):
    """Where upload sessions live, and the writer leases of a gateway running as replicas."""

    # Empty: SQLite in data_dir (one gateway process). postgresql://...: a database shared by
    # every replica. A password is better kept out of the URL (PGPASSWORD, ~/.pgpass).
    url: SecretStr = SecretStr("")
    # Unique per replica; empty: a new random id for every process.
    replica_id: str = Field("", max_length=200)
    # A replica that misses its heartbeat this long loses its uploads to other replicas.
    lease_seconds: float = Field(15.0, gt=0)
    heartbeat_seconds: float = Field(3.0, gt=0)
    min_connections: int = Field(1, ge=0, le=100)
    max_connections: int = Field(10, ge=1, le=100)

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be empty (SQLite in data_dir) or a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _heartbeat_well_within_lease(self) -> SessionsSetting:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("heartbeat_seconds must be at most half of lease_seconds")
        return self

    @property
    def postgres_url(self) -> str:
        """The PostgreSQL URL (secret: it may hold a password), or '' for SQLite."""
        return self.url.get_secret_value()


class RolesSetting(BaseModel):
    """Tenant IAM roles: the gateway assumes them with its own AWS identity.

    That identity comes from the standard AWS credential chain (AWS_* environment variables,
    shared config files, a container/pod role or the instance role).
    """

    # Session length asked of STS (900 s to the role's MaxSessionDuration, by default 1 h).
    session_duration_seconds: int = Field(3600, ge=900, le=43200)
    # Refresh temporary credentials once less than this is left of a session (in the last
    # half of that window every request waits for the refresh).
    refresh_ahead_seconds: float = Field(600.0, gt=0)
    # STS endpoint; empty: AWS's regional endpoint of sts_region.
    sts_endpoint_url: str = ""
    sts_region: str = "us-east-1"
    # The gateway's principal ARN, shown to customers (DescribeCredentials) for their trust
    # policy, e.g. arn:aws:iam::111122223333:role/recgw-gateway.
    gateway_principal_arn: str = ""

    @model_validator(mode="after")
    def _refresh_within_session(self) -> RolesSetting:
        if self.refresh_ahead_seconds >= self.session_duration_seconds:
            raise ValueError("refresh_ahead_seconds must be less than session_duration_seconds")
        return self


class DoctorSetting(BaseModel):
    """The periodic re-check of recently active tenants' credentials."""

    # Seconds between rounds; 0 turns the periodic check off (VerifyCredentials still works).
    interval_seconds: float = Field(3600.0, ge=0)
    # Tenants whose uploads used their credentials within this many seconds are checked.
    active_window_seconds: float = Field(24 * 3600.0, gt=0)


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
    spool: SpoolSetting = Field(default_factory=lambda: SpoolSetting())
    server: ServerSetting = Field(default_factory=lambda: ServerSetting())
    events: EventsSetting = Field(default_factory=lambda: EventsSetting())
    sessions: SessionsSetting = Field(default_factory=lambda: SessionsSetting())
    roles: RolesSetting = Field(default_factory=lambda: RolesSetting())
    doctor: DoctorSetting = Field(default_factory=lambda: DoctorSetting())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.tls is None and not self.plaintext:
            raise ValueError(
                "no [tls] section: set tls.cert_file and tls.key_file, or plaintext = true to "
                "listen without TLS (loopback or behind a TLS-terminating proxy only)"
            )
        if self.tls is not None and self.plaintext:
            raise ValueError("plaintext = true and a [tls] section exclude each other")
        if self.server.reuse_port and not self.sessions.postgres_url:
            raise ValueError(
                "server.reuse_port needs sessions.url (PostgreSQL): SQLite sessions in data_dir "
                "serve one gateway process"
            )
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
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    # pydantic's own text repeats the input values, which may hold secrets.
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg']}"
        for error in exc.errors(include_input=False)
    )
    return f"invalid configuration: {problems}"


class StoreSettings(BaseSettings):
    """Only what `recgw migrate` needs from the same file and variables as `recgw serve`."""

    model_config = SettingsConfigDict(
        env_prefix="RECGW_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Path("recgw-data")
    sessions: SessionsSetting = Field(default_factory=lambda: SessionsSetting())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_store_settings(config_file: Path | None = None) -> StoreSettings:
    """The session store part of the configuration (other sections are not checked)."""

    class FileStoreSettings(StoreSettings):
        model_config = SettingsConfigDict(
            env_prefix="RECGW_", env_nested_delimiter="__", extra="ignore", toml_file=config_file
        )

    try:
        return FileStoreSettings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
