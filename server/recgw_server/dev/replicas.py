"""`recgw dev --replicas N`: N `recgw serve` processes over one throwaway PostgreSQL cluster.

Each replica gets a TOML file of its own (no secret in it: the Vault secret ids and the AWS keys
of the gateway's identity travel through the environment, never a file or a command line), a
data dir and a log under the dev stack's data dir, and a port of its own, consecutive from the
first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recgw_server.dev.stack import ManagedProcess, PostgresCluster, _spawn, start_postgres


class DevStackError(RuntimeError):
    """The dev stack cannot start; the message says what to do."""


def start_dev_postgres() -> PostgresCluster:
    """A throwaway cluster for the replicas, or a DevStackError naming what to install."""
    try:
        return start_postgres()
    except RuntimeError as error:
        if "binaries not found" in str(error):
            raise DevStackError(
                "recgw dev --replicas needs the PostgreSQL server binaries (initdb, pg_ctl, "
                "postgres), found neither under /usr/lib/postgresql/*/bin nor on PATH; install "
                "them (Debian/Ubuntu: apt-get install -y postgresql; Fedora: dnf install "
                "postgresql-server; macOS: brew install postgresql), or run without --replicas "
                "(one gateway over SQLite)"
            ) from None
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            raise DevStackError(
                "as root, PostgreSQL must run as the 'postgres' user through runuser, which is "
                "missing; run recgw dev as an ordinary user"
            ) from None
        raise DevStackError(str(error)) from None


@dataclass
class Replica:
    """One `recgw serve` process of the dev stack."""

    name: str
    port: int
    config: Path
    managed: ManagedProcess

    @property
    def pid(self) -> int:
        return self.managed.process.pid

    def running(self) -> bool:
        return self.managed.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (the replica drains), then wait for it; killed if it takes too long."""
        self.managed.stop()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def to_toml(values: Mapping[str, Any], table: str = "") -> str:
    """The TOML text of nested settings (tables, arrays of tables, scalars; None left out)."""
    lines: list[str] = []
    nested: list[str] = []
    for key, value in values.items():
        name = f"{table}.{key}" if table else key
        if value is None:
            continue
        if isinstance(value, Mapping):
            nested.append(f"\n[{name}]\n" + to_toml(value, name))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            nested.extend(f"\n[[{name}]]\n" + to_toml(v, name) for v in value)
        else:
            lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines) + "".join(nested)


def start_replica(
    name: str, port: int, settings: Mapping[str, Any], env: Mapping[str, str], home: Path
) -> Replica:
    """Write the replica's configuration and start `recgw serve` with it (not waiting)."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "recgw.toml"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"# {name} of `recgw dev --replicas`; secrets come from the environment\n")
        out.write(to_toml(settings))
    recgw = Path(sys.executable).parent / "recgw"
    command = [str(recgw), "serve", "--config", str(config)]
    managed = _spawn(name, command, dict(env), home)
    return Replica(name, port, config, managed)


def replica_failure(replica: Replica) -> str:
    """Why a replica did not come up: the end of its log."""
    try:
        tail = replica.managed.log_text().strip().splitlines()[-15:]
    except OSError:
        tail = []
    status = "exited" if not replica.running() else "did not report SERVING"
    return f"{replica.name} (port {replica.port}) {status}; its log:\n  " + "\n  ".join(tail)


def stop_all(replicas: list[Replica]) -> None:
    """SIGTERM every replica at once (each drains), then wait for all of them."""
    for replica in replicas:
        if replica.running():
            replica.managed.process.send_signal(signal.SIGTERM)
    for replica in replicas:
        replica.stop()
