"""The security settings: TLS or an explicit plaintext, token scopes and identities, TLS files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recgw_server.config import ConfigError, load_settings
from recgw_server.tls import TlsError, is_loopback, load_material
from tests.secure import Pki

VAULT = """
[vault]
[vault.writer]
method = "token"
token = "w"
[vault.reader]
method = "token"
token = "r"
"""
HASH = "0" * 64


def load(tmp_path: Path, text: str) -> Any:
    config = tmp_path / "recgw.toml"
    config.write_text(text + VAULT)
    return load_settings(config)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def test_plaintext_must_be_asked_for(tmp_path: Path) -> None:
    message = refused(tmp_path, "")
    assert "no [tls] section" in message and "plaintext = true" in message
    assert load(tmp_path, "plaintext = true").plaintext
    both = refused(tmp_path, 'plaintext = true\n[tls]\ncert_file = "c"\nkey_file = "k"\n')
    assert "exclude each other" in both
    assert "metrics_tls needs" in refused(tmp_path, "plaintext = true\nmetrics_tls = true\n")


def token(**fields: str) -> str:
    lines = ["plaintext = true", "[[tokens]]", 'name = "t"', 'role = "uploader"']
    lines += [f"{k} = {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"sha256": f'"{HASH}"'}, "tokens.0.tenants: Field required"),
        ({"sha256": f'"{HASH}"', "tenants": "[]"}, 'write ["*"] for all'),
        ({"sha256": f'"{HASH}"', "tenants": '["Acme"]'}, "tenant patterns"),
        ({"sha256": '"abc"', "tenants": '["*"]'}, "64 hex digits"),
        ({"tenants": '["*"]'}, "needs sha256"),
        ({"client_identity": '"spiffe://x"', "tenants": '["*"]'}, "'dns:NAME'"),
        ({"client_identity": '"dns:x"', "tenants": '["*"]'}, "need tls.client_ca_file"),
    ],
)
def test_token_settings_are_checked(tmp_path: Path, fields: dict[str, str], problem: str) -> None:
    message = refused(tmp_path, token(**fields))
    assert problem in message
    assert HASH not in message


def test_token_names_are_unique(tmp_path: Path) -> None:
    text = token(sha256=f'"{HASH}"', tenants='["*"]')
    doubled = text + text.replace("plaintext = true\n", "").replace(HASH, "1" * 64)
    assert "unique" in refused(tmp_path, doubled)


def test_token_limits_default_from_the_limits_section(tmp_path: Path) -> None:
    text = token(sha256=f'"{HASH}"', tenants='["a", "b-*"]')
    text += (
        token(sha256=f'"{"1" * 64}"', tenants='["*"]', calls_per_second="3")
        .replace('name = "t"', 'name = "u"')
        .replace("plaintext = true\n", "")
    )
    text += "[limits]\ntoken_calls_per_second = 10\nmax_uploads_per_tenant = 4\n"
    text += "tenant_max_uploads = { big = 40 }\n"
    settings = load(tmp_path, text)
    first, second = settings.token_entries()
    assert (first.calls_per_second, first.burst) == (10, 20)
    assert (second.calls_per_second, second.burst) == (3, 6)
    assert first.tenants.allows("b-eu") and not first.tenants.allows("c")
    assert settings.limits.max_uploads("big") == 40
    assert settings.limits.max_uploads("small") == 4


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.3.2.1:1", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("unix:/run/recgw.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:50051", False),
        ("gateway.internal:50051", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_tls_files_are_checked(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    pki.install_server()
    material = load_material(pki.cert_file, pki.key_file, pki.ca_file)
    assert material.client_ca_pem == pki.ca.cert_pem
    other_key = tmp_path / "other.key"
    pki.server().write(tmp_path / "other.pem", other_key)
    with pytest.raises(TlsError, match="is not the key of the first certificate"):
        load_material(pki.cert_file, other_key, None)
    with pytest.raises(TlsError, match="holds no PEM certificate"):
        load_material(pki.key_file, pki.key_file, None)
    with pytest.raises(TlsError, match=r"cannot read tls\.client_ca_file"):
        load_material(pki.cert_file, pki.key_file, tmp_path / "missing.pem")
    with pytest.raises(TlsError, match="no unencrypted PEM private key"):
        load_material(pki.cert_file, pki.cert_file, None)


def test_serve_with_unreadable_tls_files_exits_with_the_reason(tmp_path: Path) -> None:
    import subprocess

    from tests.harness import RECGW

    config = tmp_path / "recgw.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[tls]\ncert_file = "{tmp_path / "missing.pem"}"\nkey_file = "{tmp_path / "k"}"\n' + VAULT
    )
    result = subprocess.run(
        [RECGW, "serve", "--config", str(config)], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert b"cannot read tls.cert_file" in result.stderr
    assert b"Traceback" not in result.stderr
