"""Session-wide real services: one OpenBao dev server and one moto_server with IAM on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recgw_server.devstack import MotoS3, OpenBao, start_moto, start_openbao


@pytest.fixture(scope="session")
def service_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def openbao(service_logs: Path) -> Iterator[OpenBao]:
    bao = start_openbao(service_logs)
    yield bao
    bao.stop()


@pytest.fixture(scope="session")
def moto(service_logs: Path) -> Iterator[MotoS3]:
    s3 = start_moto(service_logs)
    yield s3
    s3.stop()
