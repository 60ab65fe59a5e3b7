"""Wiring: builds the gateway from settings and runs the gRPC server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from recgw.v1 import credentials_pb2, credentials_pb2_grpc, upload_pb2, upload_pb2_grpc

from recgw_server.api.limits import TenantUploadLimits
from recgw_server.api.services import UPLOAD_METHOD, CredentialsService, UploadService
from recgw_server.api.wire import parse_upload_request
from recgw_server.audit import AuditLog
from recgw_server.auth.guard import Authenticator, AuthInterceptor
from recgw_server.config import ConfigError, RolesSetting, Settings, VaultAuthSetting, load_settings
from recgw_server.credentials.base import CredentialsAdmin, CredentialsSource
from recgw_server.credentials.changes import CredentialsChanges, LocalCredentialsChanges
from recgw_server.credentials.roles import RoleAssumer, RoleSettings
from recgw_server.credentials.vault import (
    CachedCredentialsSource,
    VaultAuth,
    VaultConnection,
    VaultCredentialsAdmin,
    VaultCredentialsSource,
)
from recgw_server.domain import Secret
from recgw_server.events.webhooks import (
    Endpoint,
    EventRouter,
    WebhookDispatcher,
    WebhookSettings,
)
from recgw_server.metrics import GatewayMetrics
from recgw_server.pipeline.budget import MemoryBudget
from recgw_server.pipeline.buffers import Spool
from recgw_server.pipeline.manager import UploadManager
from recgw_server.pipeline.model import PipelineSettings
from recgw_server.pipeline.parts import MiB
from recgw_server.sessions.base import SessionStore
from recgw_server.sessions.sqlite import SqliteSessionStore
from recgw_server.storage.base import ObjectStore
from recgw_server.storage.doctor import ActivityTrackingSource, SetupDoctor
from recgw_server.storage.s3 import S3ObjectStore, S3Settings
from recgw_server.tls import CertificateFiles, is_loopback

log = logging.getLogger(__name__)

# Threads (and kept Vault connections) for the upload path's credential reads.
VAULT_READERS = 16
# Room for the other fields of an UploadRequest beside its data.
_MESSAGE_OVERHEAD = 64 * 1024
# The most a connection's socket reads allocate at once (see the server's options).
READ_BUFFER_CAP = 256 * 1024


def _vault_auth(setting: VaultAuthSetting) -> VaultAuth:
    return VaultAuth(
        method=setting.method,
        token=Secret(setting.token.get_secret_value()) if setting.token else None,
        role_id=setting.role_id,
        secret_id=Secret(setting.secret_id.get_secret_value()) if setting.secret_id else None,
        mount_point=setting.mount_point,
    )


@dataclass
class Adapters:
    """The gateway's outside world; tests may pass their own."""

    admin: CredentialsAdmin
    source: CredentialsSource
    store: ObjectStore
    sessions: SessionStore
    changes: CredentialsChanges = field(default_factory=LocalCredentialsChanges)
    roles: RoleAssumer | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)  # run at stop


def role_settings(roles: RolesSetting, settings: Settings) -> RoleSettings:
    return RoleSettings(
        session_duration_seconds=roles.session_duration_seconds,
        refresh_ahead_seconds=roles.refresh_ahead_seconds,
        sts_endpoint_url=roles.sts_endpoint_url,
        sts_region=roles.sts_region,
        connect_timeout=settings.s3.connect_timeout_seconds,
        read_timeout=settings.s3.read_timeout_seconds,
        max_attempts=settings.s3.max_attempts,
        gateway_principal_arn=roles.gateway_principal_arn,
    )


def replica_id(settings: Settings) -> str:
    """This process's name on writer leases: configured, or new for every process."""
    return settings.sessions.replica_id or str(uuid.uuid4())


def build_adapters(settings: Settings, replica: str = "") -> Adapters:
    vault = settings.vault
    writer = VaultConnection(vault.address, _vault_auth(vault.writer), vault.timeout_seconds)
    # The upload path's reads: a pool of their own, so that a burst of new tenants reads at once.
    reader = VaultConnection(
        vault.address, _vault_auth(vault.reader), vault.timeout_seconds, threads=VAULT_READERS
    )
    source = CachedCredentialsSource(
        VaultCredentialsSource(reader, vault.kv_mount, vault.base_path), vault.cache_ttl_seconds
    )
    roles = RoleAssumer(role_settings(settings.roles, settings))
    store = S3ObjectStore(
        S3Settings(
            max_attempts=settings.s3.max_attempts,
            connect_timeout=settings.s3.connect_timeout_seconds,
            read_timeout=settings.s3.read_timeout_seconds,
            io_threads=settings.s3.io_threads,
            full_object_checksum=settings.s3.full_object_checksum,
            expect_continue=settings.s3.expect_continue,
        ),
        roles,
    )
    admin = VaultCredentialsAdmin(writer, vault.kv_mount, vault.base_path)
    url = settings.sessions.postgres_url
    if not url:
        sessions = SqliteSessionStore(settings.data_dir / "sessions.sqlite3")
        return Adapters(
            admin, source, store, sessions, LocalCredentialsChanges(), roles, [reader.close]
        )
    # Imported here: a gateway on SQLite does not pay for loading psycopg at start-up.
    from recgw_server.credentials.postgres_changes import PostgresCredentialsChanges
    from recgw_server.sessions.postgres import PostgresSessionStore

    # application_name shows in pg_stat_activity; PostgreSQL keeps 63 bytes of it.
    shared = PostgresSessionStore(
        url,
        min_connections=settings.sessions.min_connections,
        max_connections=settings.sessions.max_connections,
        application_name=f"recgw {replica}"[:63],
    )
    changes = PostgresCredentialsChanges(
        url, shared.pool, application_name=f"recgw-credentials {replica}"[:63]
    )
    return Adapters(admin, source, store, shared, changes, roles, [reader.close])


def _webhook_settings(settings: Settings) -> WebhookSettings:
    events = settings.events
    return WebhookSettings(
        endpoints=tuple(Endpoint(e.url, tuple(e.tenants)) for e in events.endpoints),
        secret=Secret(events.secret.get_secret_value()) if events.secret else None,
        max_attempts=events.max_attempts,
        initial_backoff=events.initial_backoff_seconds,
        max_backoff=events.max_backoff_seconds,
        poll_interval=events.poll_interval_seconds,
        timeout=events.timeout_seconds,
    )


def _file_stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Gateway:
    """One recgw gateway: gRPC server, upload pipeline, adapters and metrics.

    With a `config_file`, its tokens and limits are reloaded when the file changes (checked
    every `reload_check_seconds`) or on `reload()` (SIGHUP), without a restart.
    """

    def __init__(
        self,
        settings: Settings,
        adapters: Adapters | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.authenticator = Authenticator(settings.token_entries())
        self.tenant_limits = TenantUploadLimits(lambda t: self.settings.limits.max_uploads(t))
        self.audit = AuditLog(settings.audit.sink)
        self.certificates: CertificateFiles | None = None
        self.replica_id = replica_id(settings)
        self.adapters = adapters or build_adapters(settings, self.replica_id)
        self.metrics = GatewayMetrics()
        uploads = settings.uploads
        webhooks = _webhook_settings(settings)
        self.events = EventRouter(webhooks)
        self.budget = MemoryBudget(uploads.memory_budget_mib * MiB, uploads.tenant_memory_share)
        # Before the spool, which empties its directory: a worker must not empty another's.
        self._data_dir_lock = lock_data_dir(settings.data_dir) if settings.server.reuse_port else -1
        self.spool = Spool(
            settings.spool.directory or settings.data_dir / "spool",
            settings.spool.disk_budget_mib * MiB,
            settings.spool.encrypt,
        )
        self.metrics.spool_in_use_bytes.set_function(lambda: self.spool.budget.in_use)
        self.metrics.parts_spilled.set_function(lambda: self.spool.spilled_parts)
        self.metrics.memory_budget_bytes.set(self.budget.capacity)
        self.metrics.memory_in_use_bytes.set_function(lambda: self.budget.in_use)
        self.metrics.memory_waiters.set_function(lambda: self.budget.waiting)
        self.doctor = SetupDoctor(
            self.adapters.source,
            self.adapters.store,
            self.metrics,
            roles=self.adapters.roles,
            full_object_checksum=settings.s3.full_object_checksum,
        )
        self.manager = UploadManager(
            # the doctor re-checks the tenants the upload path used recently
            ActivityTrackingSource(self.adapters.source, self.doctor),
            self.adapters.store,
            self.adapters.sessions,
            self.budget,
            self.metrics,
            PipelineSettings(
                part_size=uploads.part_size_mib * MiB,
                max_inflight_parts=uploads.max_inflight_parts,
                growth_interval=uploads.growth_interval_parts,
                idle_timeout=uploads.idle_timeout_seconds,
                spill_after=uploads.spill_after_seconds,
                takeover_after=uploads.takeover_after_seconds,
                sha256=uploads.sha256,
                completion_attempts=uploads.completion_attempts,
                completion_backoff=uploads.completion_backoff_seconds,
                replica_id=self.replica_id,
                lease_seconds=settings.sessions.lease_seconds,
                shared_sessions=settings.sessions.postgres_url is not None,
            ),
            self.spool,
            self.events,
        )
        self._spiller: asyncio.Task[None] | None = None
        self.webhooks = WebhookDispatcher(self.adapters.sessions, webhooks, self.metrics)
        self.manager.on_events = self.webhooks.poke
        self._dispatcher: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.heartbeats: asyncio.Task[None] | None = None
        self._read_aheads: set[asyncio.Task[None]] = set()
        self._rechecks: asyncio.Task[None] | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._metrics_tls: tuple[ssl.SSLContext, int] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._config_stamp = _file_stamp(config_file) if config_file else (0, 0, 0)
        self._reloading = asyncio.Lock()

    async def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        sessions = self.adapters.sessions
        await sessions.open()
        sent = time.monotonic()
        await sessions.heartbeat(self.replica_id)
        self.manager.heartbeat_sent(sent)
        self.heartbeats = asyncio.ensure_future(self._keep_leases())
        self.adapters.changes.subscribe(self._credentials_changed)
        await self.adapters.changes.start()
        max_message = self.settings.uploads.max_message_mib * MiB + _MESSAGE_OVERHEAD
        tls = self.settings.tls
        if tls is not None:
            self.certificates = await asyncio.to_thread(
                CertificateFiles, tls.cert_file, tls.key_file, tls.client_ca_file
            )
        server = grpc.aio.server(
            interceptors=[
                AuthInterceptor(
                    self.authenticator,
                    self.metrics,
                    self.audit,
                    parsers={UPLOAD_METHOD: parse_upload_request},
                )
            ],
            options=[
                ("grpc.max_receive_message_length", max_message),
                # Notice dead client connections within seconds. (A resuming stream does not
                # wait for this: it takes over a silent stream, see the takeover rule.)
                ("grpc.keepalive_time_ms", int(self.settings.server.keepalive_time_seconds * 1000)),
                (
                    "grpc.keepalive_timeout_ms",
                    int(self.settings.server.keepalive_timeout_seconds * 1000),
                ),
                # No automatically grown HTTP/2 flow-control windows: a stream the pipeline is
                # not reading (waiting for memory) then buffers at most the initial window
                # instead of megabytes, with the same throughput on loopback and LAN.
                ("grpc.http2.bdp_probe", 0),
                # Each connection's read buffer grows to the largest burst it once read (about
                # a message, 1 MiB) and keeps that much allocated while idle: 0.9 MiB per open
                # connection, 450 MiB with 500 of them, outside the memory budget. Capped, it
                # stays near 130 KiB, and a stream reads at least as fast (bench: raw gRPC).
                ("grpc.experimental.tcp_max_read_buffer_size", READ_BUFFER_CAP),
                ("grpc.http2.max_pings_without_data", 0),
                # gRPC waits for a ping's ack for `ping_timeout` (60 s by default), whatever the
                # keepalive timeout says: that is why a frozen client was noticed only after
                # about a minute.
                (
                    "grpc.http2.ping_timeout_ms",
                    int(self.settings.server.keepalive_timeout_seconds * 1000),
                ),
                ("grpc.keepalive_permit_without_calls", 1),
                # Let clients ping every 10 s or more (recgw_client pings every 20 s) to notice
                # dead connections themselves.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.max_send_message_length", 4 * MiB),
                ("grpc.so_reuseport", int(self.settings.server.reuse_port)),
                (
                    "grpc.server_max_unrequested_time_in_server",
                    self.settings.server.accept_wait_seconds,
                ),
            ],
        )
        upload_pb2_grpc.add_UploadServiceServicer_to_server(
            UploadService(self.manager, self.metrics, self.tenant_limits), server
        )
        store = self.adapters.store
        credentials_pb2_grpc.add_CredentialsServiceServicer_to_server(
            CredentialsService(
                self.adapters.admin,
                self.adapters.source,
                self.doctor,
                self.metrics,
                forget_clients=store.forget,
                publish=self.adapters.changes.publish,
                trusted_principal=self.settings.roles.gateway_principal_arn,
                on_changed=self._credentials_set_here,
                audit=self.audit,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.reflection:
            from grpc_reflection.v1alpha import reflection

            names = (
                upload_pb2.DESCRIPTOR.services_by_name["UploadService"].full_name,
                credentials_pb2.DESCRIPTOR.services_by_name["CredentialsService"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server)
        listen = self.settings.listen
        if self.certificates is not None:
            self.port = server.add_secure_port(listen, self.certificates.server_credentials())
        else:
            self.port = server.add_insecure_port(listen)
            if not is_loopback(listen):
                log.warning(
                    "listening on %s WITHOUT TLS (plaintext = true): tokens, recordings and "
                    "secret keys cross the network in the clear; configure [tls] unless a "
                    "TLS-terminating proxy is in front",
                    listen,
                )
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {listen}")
        await server.start()
        self._server = server
        for service in ("", "recgw.v1.UploadService", "recgw.v1.CredentialsService"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_listen:
            self._start_metrics()
        self._expiry = asyncio.ensure_future(self._expire_periodically())
        self._spiller = asyncio.ensure_future(self.manager.run_spiller())
        self._dispatcher = asyncio.ensure_future(self.webhooks.run())
        doctor = self.settings.doctor
        if doctor.interval_seconds > 0:
            self._rechecks = asyncio.ensure_future(
                self.doctor.run_periodically(doctor.interval_seconds, doctor.active_window_seconds)
            )
        if self.settings.reload_check_seconds > 0 and (self.config_file or self._metrics_tls):
            self._watch = asyncio.ensure_future(self._watch_files())
        mode = "plaintext"
        if self.certificates is not None:
            mode = "mTLS" if self.certificates.mutual else "TLS"
        log.info("recgw listening on %s (port %d, %s)", listen, self.port, mode)
        return self.port

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        host, _, port = self.settings.metrics_listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if self.settings.metrics_tls and self.settings.tls is not None:
            tls = self.settings.tls
            self._metrics_server, _ = start_http_server(
                int(port),
                addr=host,
                registry=self.metrics.registry,
                certfile=str(tls.cert_file),
                keyfile=str(tls.key_file),
                tls_min_version=ssl.TLSVersion.TLSv1_2,
            )
            assert self.certificates is not None
            context: ssl.SSLContext = self._metrics_server.socket.context
            self._metrics_tls = (context, self.certificates.version)
            return
        if not is_loopback(self.settings.metrics_listen):
            log.warning(
                "metrics on %s without TLS; bind them to loopback or set metrics_tls = true",
                self.settings.metrics_listen,
            )
        self._metrics_server, _ = start_http_server(
            int(port), addr=host, registry=self.metrics.registry
        )

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_check_seconds)
            try:
                if self.config_file and _file_stamp(self.config_file) != self._config_stamp:
                    await self.reload()
                await self._refresh_metrics_certificate()
            except Exception:
                log.exception("checking the configuration files failed; trying again later")

    async def _refresh_metrics_certificate(self) -> None:
        if self._metrics_tls is None or self.certificates is None:
            return
        await asyncio.to_thread(self.certificates.refresh)
        context, version = self._metrics_tls
        if version == self.certificates.version:
            return
        tls = self.settings.tls
        assert tls is not None
        # New handshakes of the metrics port use the new pair; the files were just checked.
        try:
            await asyncio.to_thread(context.load_cert_chain, tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.warning("metrics keep the current certificate (%s)", type(exc).__name__)
            return
        self._metrics_tls = (context, self.certificates.version)

    async def reload(self, source: Callable[[], Settings] | None = None) -> bool:
        """Re-read the configuration and put its tokens and limits in force.

        Streams of a removed or changed token end with UNAUTHENTICATED; their uploads stay
        resumable. Other settings only change with a restart. False if the file is invalid.
        """
        async with self._reloading:
            config_file = self.config_file
            if source is None and config_file is None:
                log.warning("reload asked for, but the gateway was started without a file")
                return False
            if config_file is not None:
                self._config_stamp = _file_stamp(config_file)
            try:
                fresh = await asyncio.to_thread(source or (lambda: load_settings(config_file)))
            except ConfigError as error:
                self.metrics.config_reloads.labels("invalid").inc()
                log.error("configuration not reloaded, the old one stays in force: %s", error)
                return False
            except Exception as exc:
                self.metrics.config_reloads.labels("invalid").inc()
                log.error("configuration not reloaded (%s); the old one stays", type(exc).__name__)
                return False
            report = self.authenticator.replace(fresh.token_entries())
            unchanged = fresh.model_dump(exclude={"tokens", "limits"}) == self.settings.model_dump(
                exclude={"tokens", "limits"}
            )
            self.settings = self.settings.model_copy(
                update={"tokens": fresh.tokens, "limits": fresh.limits}
            )
            self.metrics.config_reloads.labels("ok").inc()
            log.info(
                "configuration reloaded: %d tokens (added %s, removed %s, changed %s); "
                "%d running streams ended",
                len(fresh.tokens),
                report.added or "none",
                report.removed or "none",
                report.changed or "none",
                report.streams_ended,
            )
            if not unchanged:
                log.warning("only tokens and [limits] are reloaded; other changes need a restart")
            return True

    def _credentials_changed(self, tenant_id: str | None) -> None:
        """Another replica (or this one) changed credentials: drop what is cached of them."""
        if tenant_id is None:
            self.adapters.source.invalidate_all()
            self.adapters.store.forget_all()
        else:
            self.adapters.source.invalidate(tenant_id)
            self.adapters.store.forget(tenant_id)
            self._credentials_set_here(tenant_id)

    def _credentials_set_here(self, tenant_id: str) -> None:
        """New credentials of `tenant_id` are in Vault (the caches were dropped): read them
        ahead, so that the tenant's next upload finds them and its S3 clients ready instead of
        waiting for Vault (a new tenant's first upload follows its SetCredentials)."""
        self.manager.credentials_changed(tenant_id)
        task = asyncio.get_running_loop().create_task(self._read_ahead(tenant_id))
        self._read_aheads.add(task)
        task.add_done_callback(self._read_aheads.discard)

    async def _read_ahead(self, tenant_id: str) -> None:
        # Through the cache itself, not the manager's source: a read-ahead is no upload, so it
        # does not make the doctor re-check the tenant as active.
        try:
            credentials = await self.adapters.source.get(tenant_id)
            if credentials is not None:
                await self.adapters.store.writer_for(credentials)
        except Exception as error:  # the upload that needs them reads again, and says why
            log.debug(
                "reading ahead the credentials of tenant %s failed (%s)",
                tenant_id,
                type(error).__name__,
            )

    async def _keep_leases(self) -> None:
        """One heartbeat per replica keeps all its writer leases alive."""
        sessions = self.adapters.sessions
        while True:
            await asyncio.sleep(self.settings.sessions.heartbeat_seconds)
            try:
                sent = time.monotonic()
                gap = not self.manager.leases_surely_alive()  # frozen, or the store was away
                await sessions.heartbeat(self.replica_id)
                if gap:  # until the leases are checked, every S3 request checks its own
                    await self.manager.check_leases()
                self.manager.heartbeat_sent(sent)
                await self.manager.answer_release_requests()
            except Exception as error:
                log.warning(
                    "session store heartbeat failed (%s); after %g s without one, other "
                    "replicas may take this replica's uploads over",
                    type(error).__name__,
                    self.settings.sessions.lease_seconds,
                )

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.uploads.expiry_check_seconds)
            try:
                await self.manager.expire_idle()
            except Exception:
                log.exception("expiring idle uploads failed; trying again later")

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop (SIGTERM): take no new streams; within the grace period let running
        streams reach a part boundary or finish, and detach the rest, releasing their leases so
        other replicas resume them at once."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        stopping: asyncio.Future[None] | None = None
        if self._server is not None:
            # Its first step closes the listener and sends GOAWAY: new calls go to other
            # replicas. It must run before `draining` is set, or a connection made in between
            # gets a call that gRPC cancels (CANCELLED, which clients do not retry elsewhere).
            stopping = asyncio.ensure_future(self._server.stop(grace))
            await asyncio.sleep(0)
        # Streams that were accepted before the listener closed are refused with SHUTTING_DOWN.
        self.manager.draining = True
        await self._cancel(self._expiry, self._dispatcher, self._rechecks, self._watch)
        log.info("draining: running streams get %g s to reach a part boundary or finish", grace)
        await self.manager.drain(grace)
        if stopping is not None:
            await stopping
        await self._cancel(self._spiller)  # it kept slow parts of draining streams on disk
        await self._cancel(*self._read_aheads)
        await self.manager.close()
        # Only now: the leases of draining streams had to stay alive until they detached.
        if self.heartbeats is not None:
            self.heartbeats.cancel()
            await asyncio.gather(self.heartbeats, return_exceptions=True)
        await self.adapters.changes.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.adapters.store.close()
        for close in self.adapters.closers:
            close()
        await self.adapters.sessions.close()
        self.audit.close()
        if self._data_dir_lock >= 0:
            os.close(self._data_dir_lock)
            self._data_dir_lock = -1

    @staticmethod
    async def _cancel(*tasks: asyncio.Task[None] | None) -> None:
        for task in tasks:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def lock_data_dir(data_dir: Path) -> int:
    """Hold data_dir for this process (an flock, released when the process ends); returns the
    lock's file descriptor. ConfigError when another worker holds it."""
    import fcntl

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / "worker.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"data_dir {str(data_dir)!r} is in use by another recgw worker: with "
            "server.reuse_port every worker needs a data_dir of its own (RECGW_DATA_DIR)"
        ) from None
    return fd


async def serve(settings: Settings, config_file: Path | None = None) -> None:
    """Run a gateway until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the
    configuration's tokens and limits."""
    gateway = Gateway(settings, config_file=config_file)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("shutting down")
    await gateway.stop()
