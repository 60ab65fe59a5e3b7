"""The TOML and environment of a `recgw serve` process in tests, written once.

No secret is in the file: the AppRole secret ids go in the environment, the tokens as hashes.
"""

from __future__ import annotations

import os
from pathlib import Path

from recgw_server.auth.tokens import hash_token
from recgw_server.dev.stack import OpenBao, VaultIdentities


def serve_toml(
    port: int,
    root: Path,
    bao: OpenBao,
    identities: VaultIdentities,
    *,
    tokens: dict[str, str],
    shutdown_grace: float = 2,
    data_dir: bool = True,
    audit: bool = True,
    vault_cache_ttl: float | None = None,
    sections: str = "",
) -> str:
    """A plaintext gateway on 127.0.0.1:`port` with its data and audit log under `root`, the
    AppRole identities of `identities`, one token per role in `tokens` (role to token, for
    every tenant), and `sections` (more TOML tables) at the end."""
    lines = [
        f'listen = "127.0.0.1:{port}"',
        "plaintext = true",
        f"shutdown_grace_seconds = {shutdown_grace}",
    ]
    if data_dir:
        lines.append(f'data_dir = "{root / "data"}"')
    if audit:
        lines += ["", "[audit]", f'sink = "{root / "audit.jsonl"}"']
    for role, token in tokens.items():
        lines += [
            "",
            "[[tokens]]",
            f'name = "{role}"',
            f'role = "{role}"',
            f'sha256 = "{hash_token(token)}"',
            'tenants = ["*"]',
        ]
    lines += ["", "[vault]", f'address = "{bao.address}"']
    if vault_cache_ttl is not None:
        lines.append(f"cache_ttl_seconds = {vault_cache_ttl}")
    for side, identity in (("writer", identities.writer), ("reader", identities.reader)):
        lines += ["", f"[vault.{side}]", 'method = "approle"', f'role_id = "{identity.role_id}"']
    return "\n".join(lines) + "\n" + sections


def serve_env(identities: VaultIdentities, **more: str) -> dict[str, str]:
    """This process's environment with the AppRole secret ids (and `more`) added."""
    assert identities.writer.secret_id and identities.reader.secret_id
    return {
        **os.environ,
        "RECGW_VAULT__WRITER__SECRET_ID": identities.writer.secret_id.reveal(),
        "RECGW_VAULT__READER__SECRET_ID": identities.reader.secret_id.reveal(),
        **more,
    }
