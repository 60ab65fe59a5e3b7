"""Prometheus metrics of one gateway. Labels never carry secrets, and tenant data only as the
tenant id (a validated `[a-z0-9][a-z0-9_-]{0,62}`) of `recgw_credentials_healthy`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    """All metrics of one gateway instance, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.uploads_started = Counter(
            "recgw_uploads_started", "Uploads whose start message was accepted", registry=r
        )
        self.uploads_finished = Counter(
            "recgw_uploads_finished", "Uploads that ended, by outcome", ["outcome"], registry=r
        )
        self.uploads_resumed = Counter(
            "recgw_uploads_resumed", "Streams that resumed an existing upload", registry=r
        )
        self.takeovers = Counter(
            "recgw_stream_takeovers",
            "Streams that took over an upload whose writer had gone silent",
            registry=r,
        )
        self.parts_spilled = Gauge(
            "recgw_parts_spilled",
            "Parts moved to the spool disk (they filled slowly or found memory short), in total",
            registry=r,
        )
        self.spool_in_use_bytes = Gauge(
            "recgw_spool_in_use_bytes", "Bytes of parts spooled to local disk now", registry=r
        )
        self.webhook_deliveries = Counter(
            "recgw_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed and retried, dead letter)",
            ["outcome"],
            registry=r,
        )
        self.uploads_expired = Counter(
            "recgw_uploads_expired", "Open uploads given up after the idle timeout", registry=r
        )
        self.bytes_received = Counter(
            "recgw_bytes_received", "Object bytes received from clients", registry=r
        )
        self.bytes_committed = Counter(
            "recgw_bytes_committed", "Object bytes written to S3", registry=r
        )
        self.parts_uploaded = Counter(
            "recgw_parts_uploaded", "Multipart parts written to S3", registry=r
        )
        self.part_seconds = Histogram(
            "recgw_part_upload_seconds",
            "Time to write one part (or single object) to S3",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.multipart_aborts = Counter(
            "recgw_multipart_aborts",
            "AbortMultipartUpload attempts by outcome (denied is expected under a "
            "PutObject-only policy; the bucket's lifecycle rule then cleans up)",
            ["outcome"],
            registry=r,
        )
        self.memory_budget_bytes = Gauge(
            "recgw_memory_budget_bytes", "Size of the upload memory budget", registry=r
        )
        self.memory_limit_bytes = Gauge(
            "recgw_memory_limit_bytes",
            "What upload buffers may hold now: the budget less what RSS holds beyond them "
            "(gRPC's connection buffers, freed heap the allocator keeps)",
            registry=r,
        )
        self.memory_in_use_bytes = Gauge(
            "recgw_memory_in_use_bytes", "Upload buffer memory reserved now", registry=r
        )
        self.memory_waiters = Gauge(
            "recgw_memory_waiters", "Streams waiting for buffer memory", registry=r
        )
        self.rpc_errors = Counter(
            "recgw_rpc_errors", "RPCs that ended with an error, by gRPC code", ["code"], registry=r
        )
        self.credential_writes = Counter(
            "recgw_credential_writes", "Credential changes by operation", ["operation"], registry=r
        )
        self.credentials_healthy = Gauge(
            "recgw_credentials_healthy",
            "1 when the last setup check of the tenant's credentials passed, 0 when it failed "
            "(VerifyCredentials and the periodic re-check of recently active tenants)",
            ["tenant"],
            registry=r,
        )
        self.config_reloads = Counter(
            "recgw_config_reloads",
            "Reloads of tokens and limits, by outcome",
            ["outcome"],
            registry=r,
        )
