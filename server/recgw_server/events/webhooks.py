"""Webhooks: signed, at-least-once delivery of events from the durable outbox.

Signing follows Standard Webhooks (the scheme Svix and others use; like Stripe's, over a
timestamp and the body): headers `webhook-id` (the event id, the receiver's idempotency key),
`webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256>` over
`<id>.<timestamp>.<body>` with the configured secret. A receiver checks the signature and that
the timestamp is recent, and ignores an id it has seen.

Delivery: every replica polls the outbox; a delivery is claimed for the length of one attempt,
POSTed, and marked delivered on any 2xx answer. Otherwise it is retried with exponential backoff
(`initial_backoff` doubling to `max_backoff`) until `max_attempts`, then kept as dead letter for
operators (metric `recgw_webhook_deliveries_total{outcome="dead"}`). Events survive restarts
because they are written in the same transaction as the state they report. There is no order
across events; each upload has one final event, and every event carries its `created_at`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from recgw_server.domain import Secret
from recgw_server.events.model import Delivery, Event, Outbox
from recgw_server.metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A receiver and the tenants whose events it gets (exact ids or fnmatch patterns)."""

    url: str
    tenants: tuple[str, ...] = ("*",)

    def wants(self, tenant_id: str) -> bool:
        return any(fnmatch.fnmatchcase(tenant_id, pattern) for pattern in self.tenants)


@dataclass(frozen=True)
class WebhookSettings:
    endpoints: tuple[Endpoint, ...] = ()
    secret: Secret | None = None
    max_attempts: int = 12
    initial_backoff: float = 1.0
    max_backoff: float = 600.0
    poll_interval: float = 1.0
    timeout: float = 10.0
    concurrency: int = 8


def sign(secret: Secret, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    message = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.reveal().encode(), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class EventRouter:
    """Decides which endpoints get an event; what the pipeline writes to the outbox."""

    def __init__(self, settings: WebhookSettings) -> None:
        self._endpoints = settings.endpoints

    def deliveries(self, event: Event) -> Sequence[tuple[str, Event]]:
        return [(e.url, event) for e in self._endpoints if e.wants(event.tenant_id)]


class WebhookDispatcher:
    """Polls the outbox and delivers what is due, until stopped."""

    def __init__(self, outbox: Outbox, settings: WebhookSettings, metrics: GatewayMetrics):
        self._outbox = outbox
        self._settings = settings
        self._metrics = metrics
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Something was just written to the outbox: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        if self._settings.secret is None:
            if self._settings.endpoints:
                log.error("webhook endpoints are configured but no events.secret: not sending")
            return
        limits = httpx.Limits(max_connections=self._settings.concurrency)
        async with httpx.AsyncClient(timeout=self._settings.timeout, limits=limits) as client:
            while True:
                try:
                    await self.deliver_due(client)
                except Exception:
                    log.exception("delivering webhooks failed; trying again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval)
                self._wake.clear()

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        # A claim lasts one attempt (the HTTP timeout) and a little more.
        claim = self._settings.timeout + 2
        due = await self._outbox.due_deliveries(time.time(), 100, claim)
        gate = asyncio.Semaphore(self._settings.concurrency)

        async def one(delivery: Delivery) -> None:
            async with gate:
                await self._deliver(client, delivery)

        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        assert self._settings.secret is not None
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "recgw-webhooks/1",
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(
                self._settings.secret, delivery.event_id, timestamp, delivery.body
            ),
        }
        error = ""
        try:
            response = await client.post(delivery.endpoint, content=delivery.body, headers=headers)
            if 200 <= response.status_code < 300:
                await self._outbox.delivered(delivery.id)
                self._metrics.webhook_deliveries.labels("delivered").inc()
                return
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        attempts = delivery.attempts + 1
        if attempts >= self._settings.max_attempts:
            await self._outbox.dead_letter(delivery.id, attempts, error)
            self._metrics.webhook_deliveries.labels("dead").inc()
            log.warning(
                "webhook %s for %s given up after %d attempts (%s)",
                delivery.event_id,
                delivery.endpoint,
                attempts,
                error,
            )
            return
        backoff = min(
            self._settings.max_backoff, self._settings.initial_backoff * 2 ** (attempts - 1)
        )
        await self._outbox.retry_later(delivery.id, time.time() + backoff, attempts, error)
        self._metrics.webhook_deliveries.labels("failed").inc()
        log.info(
            "webhook %s for %s failed (%s); retrying in %.1f s",
            delivery.event_id,
            delivery.endpoint,
            error,
            backoff,
        )
