"""recgw_client against the language-neutral vectors every client checks: testdata/*.json."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from recgw.v1 import upload_pb2

import recgw_client
from recgw_client import RecgwError, RetryPolicy, crc32c, is_retryable, retry_action
from recgw_client.checksums import ObjectChecksums
from recgw_client.retry import RETRY_RULES
from recgw_client.uploads import data_message, finish_fields, start_message
from tests.test_client_unit import TOKEN, FakeServer

TESTDATA = Path(__file__).resolve().parent.parent / "testdata"
VECTORS: dict[str, Any] = json.loads((TESTDATA / "vectors.json").read_text())
TABLE: dict[str, Any] = json.loads((TESTDATA / "retry_table.json").read_text())


def materialize(spec: dict[str, Any]) -> bytes:
    """The bytes a pattern describes (see testdata/generate.py)."""
    kind = spec["pattern"]
    if kind == "ascii":
        return str(spec["text"]).encode()
    if kind == "fill":
        return bytes([int(spec["byte"])]) * int(spec["length"])
    assert kind == "ramp", kind
    return bytes((i * 7 + 3) % 251 for i in range(int(spec["length"])))


# --- CRC32C --------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["crc32c"], ids=lambda v: json.dumps(v["input"]))
def test_crc32c(vector: dict[str, Any]) -> None:
    assert crc32c(materialize(vector["input"])) == vector["crc32c"]


@pytest.mark.parametrize("vector", VECTORS["crc32c_continued"])
def test_crc32c_continued(vector: dict[str, Any]) -> None:
    first, second = materialize(vector["first"]), materialize(vector["second"])
    assert crc32c(first) == vector["crc32c_first"]
    assert crc32c(second, vector["crc32c_first"]) == vector["crc32c_both"]
    checksummer = recgw_client.Checksummer()
    checksummer.update(first)
    checksummer.update(second)
    assert checksummer.result().crc32c == vector["crc32c_both"]


# --- how a byte stream is cut into messages ---------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "vector", VECTORS["chunking"], ids=lambda v: f"{v['input']['length']}/{v['chunk_size']}"
)
def test_chunking(fake: FakeServer, vector: dict[str, Any]) -> None:
    """The client's data messages: offsets, lengths and CRC32C; the finish's checksums."""
    data = materialize(vector["input"])
    before = len(fake.gateway.uploads)
    result = asyncio.run(
        recgw_client.upload(
            fake.address, TOKEN, data, "acme", "v.bin", chunk_size=vector["chunk_size"]
        )
    )
    [stream] = fake.gateway.uploads[before:]
    sent = [
        {"write_offset": r.write_offset, "length": len(r.data), "data_crc32c": r.data_crc32c}
        for r in stream.requests
        if r.data
    ]
    # An empty object is one message without data: the client's finish message.
    assert (sent or [{"write_offset": 0, "length": 0, "data_crc32c": 0}]) == vector["messages"]
    final = stream.requests[-1]
    assert final.finish_write and final.write_offset == len(data)
    assert final.object_checksums.crc32c == vector["object_crc32c"]
    assert final.object_checksums.sha256.hex() == vector["object_sha256"]
    assert result.checksums.crc32c == vector["object_crc32c"]
    assert hashlib.sha256(data).hexdigest() == vector["object_sha256"]


# --- exact bytes of the named messages -------------------------------------------------------

MESSAGES = {m["name"]: m for m in VECTORS["messages"]}


def from_fields(name: str) -> upload_pb2.UploadRequest:
    return json_format.ParseDict(MESSAGES[name]["fields"], upload_pb2.UploadRequest())


def encoded(message: upload_pb2.UploadRequest) -> str:
    return message.SerializeToString(deterministic=True).hex()


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_built_from_its_fields_has_the_exact_bytes(name: str) -> None:
    assert encoded(from_fields(name)) == MESSAGES[name]["hex"]


def test_the_clients_own_messages_have_the_exact_bytes() -> None:
    """What the client sends on the wire, built by the functions its streams use."""
    start = from_fields("start").start
    assert encoded(start_message(start, 0)) == MESSAGES["start"]["hex"]
    live = from_fields("start_unknown_length").start
    assert encoded(start_message(live, 0)) == MESSAGES["start_unknown_length"]["hex"]
    for name in ("data_first", "data_second"):
        fields = MESSAGES[name]["fields"]
        data = base64.b64decode(fields["data"])
        message = data_message(int(fields.get("write_offset", 0)), data, with_crc32c=True)
        assert encoded(message) == MESSAGES[name]["hex"], name
    sums = MESSAGES["finish"]["fields"]["object_checksums"]
    finish = upload_pb2.UploadRequest(write_offset=11)
    finish_fields(
        finish,
        ObjectChecksums(crc32c=sums["crc32c"], sha256=base64.b64decode(sums["sha256"])),
    )
    assert encoded(finish) == MESSAGES["finish"]["hex"]
    # The whole-object checksums of "hello world", as the client computes them.
    checksummer = recgw_client.Checksummer()
    checksummer.update(b"hello world")
    assert checksummer.result().crc32c == sums["crc32c"]
    assert checksummer.result().sha256 == base64.b64decode(sums["sha256"])


# --- the retry table -------------------------------------------------------------------------


def test_the_rules_are_those_of_the_table() -> None:
    assert [list(rule) for rule in RETRY_RULES] == [
        [r["code"], r["reason"], r["action"]] for r in TABLE["rules"]
    ]


@pytest.mark.parametrize(
    "case", TABLE["cases"], ids=lambda c: f"{c['code']}-{c['reason'] or 'none'}"
)
def test_every_case_of_the_table(case: dict[str, str]) -> None:
    code = grpc.StatusCode[case["code"]]
    assert retry_action(code, case["reason"]) == case["action"]
    error = RecgwError(code, "some text that must not matter", reason=case["reason"])
    assert is_retryable(error) is (case["action"] == "resume")


def test_the_default_backoff_is_that_of_the_table() -> None:
    backoff = TABLE["backoff"]
    policy = RetryPolicy()
    assert policy.initial_backoff == backoff["initial_seconds"]
    assert policy.multiplier == backoff["multiplier"]
    assert policy.max_backoff == backoff["max_seconds"]
    assert policy.jitter == backoff["jitter"]
    assert policy.outage_tolerance == backoff["outage_tolerance_seconds"]
