"""Channels (TLS or, when asked for, plaintext) and bearer-token metadata shared by the clients."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

__all__ = ["TlsConfig", "channel_credentials_for", "is_loopback_target", "target_for"]

DEFAULT_TIMEOUT = 30.0
# HTTP/2 pings while a stream is open, so a connection that dies silently (no reset) is noticed
# within seconds and the upload resumes; the gateway accepts pings this often.
# round_robin: every call (each upload stream, each status query) goes to the next of the
# target's addresses that is up, so uploads spread over the replicas a DNS name or a list of
# addresses names, and a resume after a lost replica goes to a live one.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.lb_policy_name", "round_robin"),
)

ChannelOrTarget = grpc.aio.Channel | str | Sequence[str]
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TlsConfig:
    """How the client checks the gateway, and proves itself to it (mTLS).

    ``ca_file``: PEM root certificates the gateway's certificate must chain to
    (default: the system's roots). ``cert_file`` and ``key_file``: the
    client's PEM certificate chain and private key, for a gateway that
    requires client certificates. ``server_name``: the name the gateway's
    certificate must carry, when it differs from the host of the address (for
    example when connecting by IP address).
    """

    ca_file: PathLike | None = None
    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key: pass cert_file and key_file")
        if self.server_name is not None and not self.server_name.strip():
            raise ValueError("server_name must not be empty")

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials; reads the files."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file"),
            private_key=_read(self.key_file, "client key file"),
            certificate_chain=_read(self.cert_file, "client certificate file"),
        )

    def channel_options(self) -> tuple[tuple[str, str], ...]:
        if self.server_name is None:
            return ()
        return (("grpc.ssl_target_name_override", self.server_name),)


def _read(path: PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {os.fspath(path)}: {err.strerror}") from None


def target_for(addresses: str | Sequence[str]) -> str:
    """The gRPC target of one address, or of several replicas' addresses.

    Several addresses (a list, or one string separated by commas) must be IP
    addresses with ports (``10.0.0.11:50051``, ``[fd00::11]:50051``): they
    become one ``ipv4:``/``ipv6:`` target that the channel balances over
    (round_robin). For names, give one DNS name that resolves to every
    replica (``dns:///recgw.internal:50051``).
    """
    if isinstance(addresses, str):
        if "," not in addresses:
            return addresses
        for scheme in ("ipv4:", "ipv6:"):
            if addresses.startswith(scheme):
                return addresses
        addresses = addresses.split(",")
    parts = [address.strip() for address in addresses]
    if not parts or not all(parts):
        raise ValueError("an empty gateway address in the list of addresses")
    if len(parts) == 1:
        return parts[0]
    families = set()
    for address in parts:
        host, sep, port = address.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            ip = None
        if not sep or not port.isdigit() or ip is None:
            raise ValueError(
                f"several gateway addresses must each be IP:port ({address!r} is not); for "
                "names, give one DNS name that resolves to every replica"
            )
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError("several gateway addresses must be all IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(parts)


def _addresses(target: str) -> list[str]:
    """The addresses of a target: one, or those of an ``ipv4:``/``ipv6:`` list."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return target[len(scheme) :].split(",")
    return [target]


def _host(target: str) -> str:
    """The host of a gRPC target such as ``host:port``, ``[::1]:50051`` or ``dns:///host:port``."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1:].partition("]")[0]
    if target.count(":") > 1:  # a bare IPv6 address
        return target
    return target.rpartition(":")[0] if ":" in target else target


def is_loopback_target(target: str) -> bool:
    """Whether the address is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    if target.startswith("unix:"):
        return True
    return all(_is_loopback_host(_host(address)) for address in _addresses(target))


def _is_loopback_host(host: str) -> bool:
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_credentials_for(
    target: str, tls: TlsConfig | None = None, plaintext: bool | None = None
) -> grpc.ChannelCredentials | None:
    """The credentials of a channel to ``target``; None means plaintext.

    Plaintext only when asked for (``plaintext=True``), or by default for a
    loopback address; every other address gets TLS (``tls``, else the
    system's roots).
    """
    if plaintext and tls is not None:
        raise ValueError("pass either plaintext=True or TLS options, not both")
    if plaintext is None:
        plaintext = tls is None and is_loopback_target(target)
    if plaintext:
        return None
    return (tls or TlsConfig()).credentials()


def open_channel(
    channel_or_target: ChannelOrTarget,
    *,
    tls: TlsConfig | None = None,
    plaintext: bool | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[grpc.aio.Channel, bool]:
    """The channel to use, and whether the caller owns (must close) it."""
    if not isinstance(channel_or_target, str | Sequence):
        if credentials is not None or tls is not None or plaintext is not None:
            raise ValueError("TLS options and credentials only apply when an address is given")
        return channel_or_target, False
    target = target_for(channel_or_target)
    several = len(_addresses(target)) > 1
    if credentials is not None:
        if plaintext:
            raise ValueError("pass either plaintext=True or channel_credentials, not both")
    else:
        credentials = channel_credentials_for(target, tls, plaintext)
    if several and credentials is not None and (tls is None or tls.server_name is None):
        # the target names no host to check the replicas' certificates against
        raise ValueError(
            "TLS to several gateway addresses needs the name their certificates carry: "
            "tls=TlsConfig(server_name=...)"
        )
    options = CHANNEL_OPTIONS + (tls.channel_options() if tls is not None else ())
    if credentials is None:
        return grpc.aio.insecure_channel(target, options), True
    return grpc.aio.secure_channel(target, credentials, options), True


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata for a token; errors never show the token."""
    token = token.strip()
    if not token:
        raise ValueError("the bearer token is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the bearer token must be printable ASCII without spaces")
    return (("authorization", f"Bearer {token}"),)
