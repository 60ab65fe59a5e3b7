"""The zero-copy UploadRequest parser reads every message as protobuf does."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from recgw.v1 import upload_pb2

from recgw_server.api.wire import ZERO_COPY_MIN_BYTES, UploadMessage, parse_upload_request


def _same(raw: bytes) -> UploadMessage | None:
    """Parse `raw` both ways; the fields and the data must agree, or both must refuse (None)."""
    try:
        expected = upload_pb2.UploadRequest.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_upload_request(raw)
        return None
    parsed = parse_upload_request(raw)
    assert bytes(parsed.data) == expected.data
    request = upload_pb2.UploadRequest()
    request.CopyFrom(parsed.request)
    request.data = bytes(parsed.data)
    assert request == expected
    return parsed


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(data: bytes, **fields: object) -> upload_pb2.UploadRequest:
    message = upload_pb2.UploadRequest(data=data, **fields)  # type: ignore[arg-type]
    return message


def test_a_large_messages_data_is_a_view_of_the_received_bytes() -> None:
    data = os.urandom(ZERO_COPY_MIN_BYTES + 1)
    start = upload_pb2.UploadStart(tenant_id="t-1", object_name="calls/a.webm")
    raw = _message(
        data, start=start, write_offset=7, finish_write=True, data_crc32c=99
    ).SerializeToString()
    parsed = _same(raw)
    assert parsed is not None
    assert isinstance(parsed.data, memoryview) and parsed.data.obj is raw
    assert parsed.request.data == b""
    assert parsed.request.start.object_name == "calls/a.webm"
    assert parsed.request.HasField("data_crc32c") and parsed.request.data_crc32c == 99


def test_the_data_field_anywhere_and_unknown_fields_beside_it() -> None:
    data = os.urandom(ZERO_COPY_MIN_BYTES)
    body = _message(data).SerializeToString()
    offset = _message(b"", write_offset=1 << 40).SerializeToString()
    unknown = _varint(99 << 3 | 2) + b"\x03abc"  # an unknown field of 3 bytes
    fixed = _varint(98 << 3 | 5) + b"\x01\x02\x03\x04"  # an unknown fixed32
    wide = _varint(97 << 3 | 1) + bytes(8)  # an unknown fixed64
    for raw in (body + offset, offset + body, offset + body + unknown, fixed + body + wide):
        _same(raw)


def test_a_repeated_data_field_keeps_the_last_like_protobuf() -> None:
    first, second = os.urandom(ZERO_COPY_MIN_BYTES), os.urandom(ZERO_COPY_MIN_BYTES)
    raw = _message(first).SerializeToString() + _message(second).SerializeToString()
    parsed = _same(raw)
    assert parsed is not None and bytes(parsed.data) == second


def test_truncated_and_garbage_bytes_are_refused_like_protobuf() -> None:
    raw = _message(os.urandom(ZERO_COPY_MIN_BYTES), write_offset=5).SerializeToString()
    for broken in (raw[:-1], raw[:3], b"\xff" * ZERO_COPY_MIN_BYTES, raw + b"\x0f"):
        assert _same(broken) is None


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([0, 1, ZERO_COPY_MIN_BYTES - 1, ZERO_COPY_MIN_BYTES, 70_000]),
    offset=st.integers(0, 1 << 62),
    finish=st.booleans(),
    crc=st.none() | st.integers(0, (1 << 32) - 1),
    cut=st.none() | st.integers(0, 80_000),
)
def test_any_message_or_its_prefix_parses_as_protobuf_parses_it(
    size: int, offset: int, finish: bool, crc: int | None, cut: int | None
) -> None:
    message = _message(b"\xab" * size, write_offset=offset, finish_write=finish)
    if crc is not None:
        message.data_crc32c = crc
    raw = message.SerializeToString()
    parsed = _same(raw if cut is None else raw[:cut])
    assert parsed is not None or cut is not None
