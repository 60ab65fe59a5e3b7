"""The local stack really enforces IAM: the seed's PutObject-only policy is all a writer gets."""

from __future__ import annotations

import botocore.exceptions
import pytest

from recgw_server.dev.stack import MotoS3, OpenBao, seed_policy


def test_moto_enforces_the_seed_policy(moto: MotoS3) -> None:
    moto.create_bucket("devstack-check")
    writer = moto.create_user("devstack-writer", seed_policy("devstack-check"))
    s3 = moto.client("s3", writer)
    s3.put_object(Bucket="devstack-check", Key="uploads/a", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        s3.get_object(Bucket="devstack-check", Key="uploads/a")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_openbao_dev_server_answers(openbao: OpenBao) -> None:
    client = openbao.root_client()
    assert client.is_authenticated()
    assert not client.sys.read_seal_status()["sealed"]
