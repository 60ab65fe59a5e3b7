"""Signed completion events: the outbox contract in `model`, webhook delivery in `webhooks`."""
