"""Upload messages without copying their data.

protobuf copies a bytes field twice: once while parsing, once more when Python reads it. For an
UploadRequest of a megabyte those two copies cost as much CPU as the rest of its way to S3, so a
large message's `data` is found in the wire format and kept as a view of the bytes gRPC
delivered; protobuf parses only the small rest (start, offsets, checksums) and validates it.
"""

from __future__ import annotations

from recgw.v1 import upload_pb2

# Below this size protobuf's own parse is cheaper than walking the fields in Python.
ZERO_COPY_MIN_BYTES = 64 * 1024
_DATA_FIELD = upload_pb2.UploadRequest.DESCRIPTOR.fields_by_name["data"].number
_LENGTH_DELIMITED = 2


class UploadMessage:
    """An UploadRequest as received: its fields in `request` (whose own `data` is empty when
    `data` was taken out without a copy), and its data."""

    __slots__ = ("data", "request")

    def __init__(self, request: upload_pb2.UploadRequest, data: bytes | memoryview) -> None:
        self.request = request
        self.data = data

    @classmethod
    def of(cls, message: upload_pb2.UploadRequest | UploadMessage) -> UploadMessage:
        """`message` as an UploadMessage (the servicer also accepts parsed requests)."""
        if isinstance(message, UploadMessage):
            return message
        return cls(message, message.data)


def _varint(raw: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _data_span(raw: bytes) -> tuple[int, int, int] | None:
    """(tag start, data start, data end) of the one `data` field, or None: no such field, more
    than one, or anything this walk does not handle (protobuf then parses all of it)."""
    found: tuple[int, int, int] | None = None
    position = 0
    try:
        while position < len(raw):
            tag_start = position
            tag, position = _varint(raw, position)
            field, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, position = _varint(raw, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 5:
                position += 4
            elif wire_type == _LENGTH_DELIMITED:
                length, position = _varint(raw, position)
                if field == _DATA_FIELD:
                    if found is not None:
                        return None  # repeated: protobuf's rule (the last one wins) decides
                    found = (tag_start, position, position + length)
                position += length
            else:
                return None  # groups, or garbage
            if position > len(raw):
                return None
    except ValueError:
        return None
    return found


def parse_upload_request(raw: bytes) -> UploadMessage:
    """An UploadRequest from its wire bytes; a large `data` is a view of `raw`, not a copy.

    Raises what protobuf raises for bytes that are not an UploadRequest.
    """
    span = _data_span(raw) if len(raw) >= ZERO_COPY_MIN_BYTES else None
    if span is None:
        request = upload_pb2.UploadRequest.FromString(raw)
        return UploadMessage(request, request.data)
    tag_start, start, end = span
    request = upload_pb2.UploadRequest.FromString(raw[:tag_start] + raw[end:])
    return UploadMessage(request, memoryview(raw)[start:end])
