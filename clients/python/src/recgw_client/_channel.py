"""Channels and bearer-token metadata shared by the clients."""

from __future__ import annotations

import grpc

DEFAULT_TIMEOUT = 30.0
# HTTP/2 pings while a stream is open, so a connection that dies silently (no reset) is noticed
# within seconds and the upload resumes; the gateway accepts pings this often.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

ChannelOrTarget = grpc.aio.Channel | str


def open_channel(
    channel_or_target: ChannelOrTarget,
    credentials: grpc.ChannelCredentials | None,
) -> tuple[grpc.aio.Channel, bool]:
    """The channel to use, and whether the caller owns (must close) it."""
    if isinstance(channel_or_target, str):
        if credentials is None:
            return grpc.aio.insecure_channel(channel_or_target, CHANNEL_OPTIONS), True
        return grpc.aio.secure_channel(channel_or_target, credentials, CHANNEL_OPTIONS), True
    if credentials is not None:
        raise ValueError("channel_credentials only apply when a target address is given")
    return channel_or_target, False


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata for a token; errors never show the token."""
    token = token.strip()
    if not token:
        raise ValueError("the bearer token is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the bearer token must be printable ASCII without spaces")
    return (("authorization", f"Bearer {token}"),)
