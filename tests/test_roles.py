"""Tenant IAM roles against moto's STS and IAM (enforcement on), through a recording proxy.

What moto 5.2 enforces, found by reading moto/iam/access_control.py and checked by
test_what_moto_sts_enforces:
- the caller's identity policy must allow sts:AssumeRole;
- the role's trust policy is evaluated: its Principal must equal the caller's ARN literally (an
  account root principal such as arn:aws:iam::123456789012:root matches nobody), and a
  StringEquals sts:ExternalId condition refuses a WRONG external id;
- assumed-role credentials are checked on every request (session token included) and carry
  the role's own policies, so the permission policy is enforced for S3.
What it does not: an AssumeRole WITHOUT ExternalId passes a trust policy that requires one
(moto skips conditions whose key the request lacks), a role that does not exist can be
"assumed", DurationSeconds has no lower bound server-side (botocore refuses < 900 itself), and
session credentials never expire. So the tests assert from the proxy's record that every
AssumeRole carried the tenant's ExternalId and RoleSessionName, and the proxy itself shortens
each session (it rewrites Expiration in STS's answer) and refuses requests signed with a
session past it, as AWS does with ExpiredToken.
"""

from __future__ import annotations

import ast
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.exceptions
import grpc
import pytest
import typer.testing

from recgw_server.cli import app
from recgw_server.dev.stack import MotoS3, gateway_identity_policy, wait_until
from tests.harness import (
    GatewayThread,
    MiB,
    check_results,
    error_info,
    read_object,
    register_canary,
    set_role_credentials,
    upload,
    upload_messages,
    verify_credentials,
)
from tests.http_proxy import RecordingProxy, Request, Response

ACCOUNT = "123456789012"


def is_assume_role(request: Request) -> bool:
    return "/sts/aws4_request" in request.headers.get("authorization", "") and (
        request.form.get("Action") == "AssumeRole"
    )


def is_s3(request: Request) -> bool:
    return "/s3/aws4_request" in request.headers.get("authorization", "")


def remember_session_secrets(request: Request, response: Response) -> Response:
    """Every session secret STS hands the gateway becomes a canary no log may contain."""
    if is_assume_role(request):
        for tag in ("SecretAccessKey", "SessionToken"):
            found = re.search(rf"<{tag}>([^<]+)</{tag}>".encode(), response.body)
            if found:
                register_canary(found.group(1).decode())
    return response


@dataclass(frozen=True)
class Identity:
    arn: str
    access_key_id: str


@dataclass
class Gateway:
    """A gateway that assumes roles with its own identity (environment variables)."""

    thread: GatewayThread
    proxy: RecordingProxy
    identity: Identity

    @property
    def principal(self) -> str:
        return self.identity.arn


@pytest.fixture
def gateway_identity(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Identity:
    """The gateway's own IAM user, handed over the standard chain (AWS_* variables)."""
    name = f"recgw-gateway-{uuid.uuid4().hex[:8]}"
    keys = moto.create_user(name, gateway_identity_policy())
    register_canary(keys.secret_access_key.reveal())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys.secret_access_key.reveal())
    for variable in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    arn = str(moto.client("iam").get_user(UserName=name)["User"]["Arn"])
    return Identity(arn, keys.access_key_id)


@pytest.fixture
def role_gateway(
    moto: MotoS3, gateway_identity: Identity, make_gateway: Callable[..., GatewayThread]
) -> Iterator[Callable[..., Gateway]]:
    proxies: list[RecordingProxy] = []

    def make(proxy: RecordingProxy | None = None, **roles: Any) -> Gateway:
        proxy = proxy or RecordingProxy(moto.endpoint_url, rewrite=remember_session_secrets)
        proxies.append(proxy)
        settings = {
            "sts_endpoint_url": proxy.url,
            "gateway_principal_arn": gateway_identity.arn,
            "session_duration_seconds": 900,  # the shortest STS allows
            "refresh_ahead_seconds": 300,
            **roles,
        }
        thread = make_gateway(roles=settings, doctor={"interval_seconds": 0})
        return Gateway(thread, proxy, gateway_identity)

    yield make
    for proxy in proxies:
        proxy.close()


def role_arn_named(role_name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{role_name}"


def create_role(
    moto: MotoS3,
    bucket: str,
    principal: str,
    external_id: str,
    role_name: str,
    *,
    cloudformation: bool = True,
) -> str:
    """The role, made from what `recgw policy --role` prints; returns its ARN.

    With `cloudformation` from its template (moto's first CloudFormation call costs seconds),
    else from its trust and permission policies through the IAM API. moto keeps a
    CloudFormation role's inline policy as the Python repr of a dict, which its own IAM
    enforcement cannot read (every request with the role's credentials then fails with a 500),
    so the same permission policy is put again through the IAM API.
    """
    result = typer.testing.CliRunner().invoke(
        app,
        [
            "policy",
            "--bucket",
            bucket,
            "--role",
            "--gateway-principal",
            principal,
            "--external-id",
            external_id,
            "--role-name",
            role_name,
        ],
    )
    assert result.exit_code == 0, result.stderr
    documents = json.loads(result.stdout)
    iam = moto.client("iam")
    if not cloudformation:
        iam.create_role(
            RoleName=role_name, AssumeRolePolicyDocument=json.dumps(documents["trust_policy"])
        )
        iam.put_role_policy(
            RoleName=role_name,
            PolicyName="recgw-write-recordings",
            PolicyDocument=json.dumps(documents["permission_policy"]),
        )
        return role_arn_named(role_name)
    stacks = moto.client("cloudformation")
    stacks.create_stack(
        StackName=role_name,
        TemplateBody=json.dumps(documents["cloudformation_template"]),
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    [stack] = stacks.describe_stacks(StackName=role_name)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    [output] = stack["Outputs"]
    role = iam.get_role(RoleName=role_name)["Role"]
    assert role["AssumeRolePolicyDocument"] == documents["trust_policy"]
    [policy_name] = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    stored = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
    assert ast.literal_eval(str(stored)) == documents["permission_policy"]
    iam.put_role_policy(
        RoleName=role_name,
        PolicyName=policy_name,
        PolicyDocument=json.dumps(documents["permission_policy"]),
    )
    return str(output["OutputValue"])


def new_bucket(moto: MotoS3) -> str:
    name = f"recgw-role-{uuid.uuid4().hex[:10]}"
    moto.create_bucket(name)
    return name


def test_onboarding_with_a_role(moto: MotoS3, role_gateway: Callable[..., Gateway]) -> None:
    """No secret is exchanged: SetCredentials takes a role ARN, recgw makes the external id,
    the customer creates the role from `recgw policy --role`, and uploads work with it."""
    gw = role_gateway()
    bucket = new_bucket(moto)
    tenant_id = f"t-role-{uuid.uuid4().hex[:8]}"
    # The customer picks the role's name, tells recgw, and learns the external id to trust.
    role_name = f"recgw-writer-{uuid.uuid4().hex[:8]}"
    role_arn = role_arn_named(role_name)
    first = set_role_credentials(gw.thread, tenant_id, bucket, role_arn, endpoint_url=gw.proxy.url)
    view = first.credentials
    assert (view.role_arn, view.access_key_id_hint) == (role_arn, "")
    assert re.fullmatch(r"recgw-[0-9a-f]{32}", view.external_id)
    assert view.trusted_principal == gw.principal
    # An overwrite keeps the external id; only a rotation renews it (below).
    second = set_role_credentials(gw.thread, tenant_id, bucket, role_arn, endpoint_url=gw.proxy.url)
    assert second.credentials.external_id == view.external_id
    assert second.credentials.version == view.version + 1
    assert create_role(moto, bucket, gw.principal, view.external_id, role_name) == role_arn

    report = verify_credentials(gw.thread, tenant_id)
    assert report.ok, report
    assert check_results(report) == {
        "assume_role": "PASSED",
        "bucket_region": "SKIPPED",  # moto sends no x-amz-bucket-region with its 403
        "create_multipart_upload": "PASSED",
        "upload_part": "PASSED",
        "complete_multipart_upload": "PASSED",
        "conditional_write": "PASSED",
    }

    data = bytes(range(256)) * (6 * MiB // 256)  # two parts of the gateway's 5 MiB
    response = upload(gw.thread, upload_messages(tenant_id, "role/call.webm", data))
    assert response.part_count == 2
    assert read_object(moto, bucket, response.key) == data

    calls = gw.proxy.recorded(is_assume_role)
    assert calls
    for call in calls:
        assert call.form["RoleArn"] == role_arn
        assert call.form["ExternalId"] == view.external_id
        assert call.form["RoleSessionName"] == f"recgw-{tenant_id}"
        assert call.form["DurationSeconds"] == "900"
        assert call.access_key_id == gw.identity.access_key_id  # the gateway's own identity
    writes = gw.proxy.recorded(lambda r: is_s3(r) and r.method in ("PUT", "POST"))
    assert writes
    assert all("x-amz-security-token" in w.headers for w in writes)  # session credentials

    # A rotation: until the trust policy names the new id, STS refuses, and the doctor and an
    # upload say so in the customer's terms.
    rotated = set_role_credentials(
        gw.thread, tenant_id, bucket, role_arn, endpoint_url=gw.proxy.url, rotate_external_id=True
    ).credentials
    assert rotated.external_id != view.external_id
    report = verify_credentials(gw.thread, tenant_id)
    assert not report.ok and report.error_code == "AccessDenied"
    [assume] = [c for c in report.checks if c.name == "assume_role"]
    assert assume.missing_permission == f"sts:AssumeRole on {role_arn}"
    assert rotated.external_id in assume.fix and gw.principal in assume.fix
    assert set(check_results(report).values()) == {"FAILED", "SKIPPED"}
    with pytest.raises(grpc.RpcError) as caught:
        upload(gw.thread, upload_messages(tenant_id, "role/after-rotation.webm", b"x"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reason, facts = error_info(caught.value)
    assert reason == "ACCESS_DENIED"
    assert (facts["operation"], facts["store_code"]) == ("AssumeRole", "AccessDenied")
    assert gw.proxy.recorded(is_assume_role)[-1].form["ExternalId"] == rotated.external_id


@dataclass
class ShortSessions:
    """Proxy hooks: every STS session lasts `seconds`, and S3 refuses expired ones (ExpiredToken).

    moto never expires session credentials; this is what AWS does at the end of a session.
    """

    seconds: float
    expiry: dict[str, float] = field(default_factory=dict)  # access key id -> time.time()
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rewrite(self, request: Request, response: Response) -> Response:
        if not is_assume_role(request) or response.status != 200:
            return response
        remember_session_secrets(request, response)
        body = response.body.decode()
        ends = time.time() + self.seconds
        stamp = datetime.fromtimestamp(ends, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = re.sub(r"<Expiration>[^<]+</Expiration>", f"<Expiration>{stamp}</Expiration>", body)
        key = re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", body)
        assert key is not None
        with self.lock:
            self.expiry[key.group(1)] = ends
        return Response(response.status, response.headers, body.encode())

    def answer(self, request: Request) -> Response | None:
        if not is_s3(request):
            return None
        key = request.access_key_id
        with self.lock:
            expired = key in self.expiry and time.time() >= self.expiry[key]
            if expired:
                self.refused.append(request.path)
        if not expired:
            return None
        return Response(
            400,
            {"Content-Type": "application/xml"},
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
            b"<Message>The provided token has expired.</Message></Error>",
        )

    def remaining(self, key: str) -> float:
        with self.lock:
            return self.expiry[key] - time.time()


def test_an_upload_outlives_several_role_sessions(
    moto: MotoS3, role_gateway: Callable[..., Gateway]
) -> None:
    """Sessions of 1.5 s (the proxy's doing, see ShortSessions; the gateway asks for 900 s, the
    shortest STS grants) and a refresh 0.9 s ahead (every request waits for it in the last
    0.45 s): each part is sent when the previous part's session has under 0.35 s left, and must
    go out signed by a fresh session; no request may ever arrive with an expired one."""
    sessions = ShortSessions(seconds=1.5)
    proxy = RecordingProxy(moto.endpoint_url, answer=sessions.answer, rewrite=sessions.rewrite)
    gw = role_gateway(proxy, refresh_ahead_seconds=0.9)
    bucket = new_bucket(moto)
    tenant_id = f"t-refresh-{uuid.uuid4().hex[:8]}"
    role_name = f"recgw-writer-{uuid.uuid4().hex[:8]}"
    view = set_role_credentials(
        gw.thread, tenant_id, bucket, role_arn_named(role_name), endpoint_url=proxy.url
    ).credentials
    create_role(moto, bucket, gw.principal, view.external_id, role_name, cloudformation=False)

    def part_requests() -> list[Request]:
        return proxy.recorded(lambda r: is_s3(r) and "partNumber" in r.query)

    parts = 3
    data = bytes(range(256)) * (parts * 5 * MiB // 256)

    def paced() -> Iterator[Any]:
        for message in upload_messages(tenant_id, "long/call.webm", data):
            part, offset = divmod(message.write_offset, 5 * MiB)
            if part and offset == MiB:
                # a part goes out once data beyond it came: now wait until the session that
                # signed it is about to end
                wait_until(lambda p=part: len(part_requests()) >= p, 10, f"part {part} sent")
                key = part_requests()[part - 1].access_key_id
                wait_until(lambda k=key: sessions.remaining(k) < 0.35, 10, "the session to age")
            yield message

    response = upload(gw.thread, paced())
    assert read_object(moto, bucket, response.key) == data
    assert response.part_count == parts
    assert sessions.refused == []  # no part, no completion ever went out with an expired session
    signers = [r.access_key_id for r in part_requests()]
    assert len(signers) == parts
    assert len(set(signers)) == parts, "every part after the first needed a fresh session"
    assert len(proxy.recorded(is_assume_role)) >= parts


def test_what_moto_sts_enforces(moto: MotoS3) -> None:
    """The emulator facts the tests above rely on (see the module docstring), so that a moto
    upgrade that changes them shows up here first."""
    iam = moto.client("iam")
    name = f"recgw-fact-{uuid.uuid4().hex[:8]}"
    caller = moto.create_user(
        name,
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
        },
    )
    caller_arn = iam.get_user(UserName=name)["User"]["Arn"]
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": caller_arn},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": "the-right-id"}},
            }
        ],
    }
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    sts = moto.client("sts", caller)

    def assume(**extra: Any) -> dict[str, Any]:
        result: dict[str, Any] = sts.assume_role(
            RoleArn=role["Arn"], RoleSessionName="recgw-facts", **extra
        )
        return result

    assume(ExternalId="the-right-id")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        assume(ExternalId="a-wrong-id")
    assert caught.value.response["Error"]["Code"] == "AccessDenied"
    assume()  # NOT enforced: no ExternalId at all passes (AWS refuses it)
    with pytest.raises(botocore.exceptions.ParamValidationError):
        assume(ExternalId="the-right-id", DurationSeconds=899)  # botocore's check, not moto's
    issued = assume(ExternalId="the-right-id", DurationSeconds=900)["Credentials"]
    assert issued["Expiration"] - datetime.now(UTC) < timedelta(seconds=901)
    session = boto3.client(
        "sts",
        endpoint_url=moto.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=issued["AccessKeyId"],
        aws_secret_access_key=issued["SecretAccessKey"],
        aws_session_token=issued["SessionToken"],
    )
    assert session.get_caller_identity()["Arn"].endswith(f"assumed-role/{name}/recgw-facts")
