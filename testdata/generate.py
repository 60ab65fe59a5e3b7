"""Writes the language-neutral test vectors every recgw client checks itself against.

Run `python testdata/generate.py` (from the repo's virtualenv: it needs the generated recgw.v1
Python code and awscrt) after changing the protocol; commit its output, `vectors.json`. The retry
table, `retry_table.json`, is written by hand: it is the specification, not derived from code.

Byte patterns are described, not stored, so each client regenerates the bytes itself:
- `{"pattern": "ascii", "text": T}`: the UTF-8 bytes of T;
- `{"pattern": "fill", "byte": B, "length": N}`: N bytes of value B;
- `{"pattern": "ramp", "length": N}`: byte i is `(i * 7 + 3) % 251`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from awscrt import checksums
from google.protobuf import json_format
from recgw.v1 import upload_pb2

HERE = Path(__file__).resolve().parent


def materialize(spec: dict[str, Any]) -> bytes:
    kind = spec["pattern"]
    if kind == "ascii":
        return str(spec["text"]).encode()
    if kind == "fill":
        return bytes([int(spec["byte"])]) * int(spec["length"])
    if kind == "ramp":
        return bytes((i * 7 + 3) % 251 for i in range(spec["length"]))
    raise ValueError(kind)


def crc32c(data: bytes, previous: int = 0) -> int:
    return int(checksums.crc32c(data, previous))


def crc_vectors() -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = [
        {"pattern": "ascii", "text": ""},
        {"pattern": "ascii", "text": "123456789"},
        {"pattern": "ascii", "text": "The quick brown fox jumps over the lazy dog"},
        {"pattern": "fill", "byte": 0, "length": 32},
        {"pattern": "fill", "byte": 255, "length": 32},
        {"pattern": "ramp", "length": 1},
        {"pattern": "ramp", "length": 4096},
        {"pattern": "ramp", "length": 1_048_576},
    ]
    return [{"input": s, "crc32c": crc32c(materialize(s))} for s in specs]


def continued_vectors() -> list[dict[str, Any]]:
    """CRC32C carried across buffers: crc(a + b) == crc(b, previous=crc(a))."""
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"pattern": "ascii", "text": "1234"}, {"pattern": "ascii", "text": "56789"}),
        ({"pattern": "ramp", "length": 65536}, {"pattern": "fill", "byte": 170, "length": 1000}),
        ({"pattern": "fill", "byte": 0, "length": 0}, {"pattern": "ramp", "length": 100}),
    ]
    out = []
    for first, second in cases:
        a, b = materialize(first), materialize(second)
        out.append(
            {
                "first": first,
                "second": second,
                "crc32c_first": crc32c(a),
                "crc32c_both": crc32c(b, crc32c(a)),
            }
        )
    return out


def chunking_vectors() -> list[dict[str, Any]]:
    """How an object of `size` ramp bytes is cut into messages of at most `chunk_size` bytes.

    A client sends exactly these messages (an empty object: one message with no data), each with
    its `write_offset`, `length` and `data_crc32c`; the last one sets `finish_write` and the
    whole-object checksums.
    """
    out = []
    for size, chunk in (
        (0, 65536),
        (1, 65536),
        (65536, 65536),
        (65537, 65536),
        (196625, 65536),
        (3_145_731, 1_048_576),
    ):
        data = materialize({"pattern": "ramp", "length": size})
        messages = []
        offset = 0
        while True:
            piece = data[offset : offset + chunk]
            messages.append(
                {"write_offset": offset, "length": len(piece), "data_crc32c": crc32c(piece)}
            )
            offset += len(piece)
            if offset >= size:
                break
        out.append(
            {
                "input": {"pattern": "ramp", "length": size},
                "chunk_size": chunk,
                "messages": messages,
                "object_crc32c": crc32c(data),
                "object_sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return out


def message_vectors() -> list[dict[str, Any]]:
    """Exact protobuf encodings of UploadRequest messages (fields in number order)."""
    start = upload_pb2.UploadRequest(
        start=upload_pb2.UploadStart(
            tenant_id="acme",
            object_name="2026/11/28/call-42.webm",
            content_type="video/webm",
            metadata={"room": "blue"},
            expected_size=11,
            upload_id="6f1c2a4e-8a47-4a53-9d2e-0c7b8f4e2d11",
            compute_sha256=True,
        ),
        write_offset=0,
    )
    start_unknown_length = upload_pb2.UploadRequest(
        start=upload_pb2.UploadStart(
            tenant_id="acme",
            object_name="live.webm",
            upload_id="6f1c2a4e-8a47-4a53-9d2e-0c7b8f4e2d11",
            compute_sha256=True,
        ),
    )
    body = b"hello world"
    data = upload_pb2.UploadRequest(write_offset=0, data=body[:5], data_crc32c=crc32c(body[:5]))
    data_later = upload_pb2.UploadRequest(
        write_offset=5, data=body[5:], data_crc32c=crc32c(body[5:])
    )
    finish = upload_pb2.UploadRequest(
        write_offset=11,
        finish_write=True,
        object_checksums=upload_pb2.ObjectChecksums(
            crc32c=crc32c(body), sha256=hashlib.sha256(body).digest()
        ),
    )
    resume = upload_pb2.UploadRequest(
        start=upload_pb2.UploadStart(
            tenant_id="acme",
            object_name="live.webm",
            upload_id="6f1c2a4e-8a47-4a53-9d2e-0c7b8f4e2d11",
            compute_sha256=True,
        ),
        write_offset=8388608,
        data=b"\x00\x01",
        data_crc32c=crc32c(b"\x00\x01"),
    )
    named = {
        "start": start,
        "start_unknown_length": start_unknown_length,
        "data_first": data,
        "data_second": data_later,
        "finish": finish,
        "resume_start_with_data": resume,
    }
    out = []
    for name, message in named.items():
        out.append(
            {
                "name": name,
                "fields": json_format.MessageToDict(message, preserving_proto_field_name=True),
                "hex": message.SerializeToString(deterministic=True).hex(),
            }
        )
    return out


def main() -> None:
    vectors = {
        "comment": "Generated by testdata/generate.py; see its docstring for the byte patterns.",
        "crc32c": crc_vectors(),
        "crc32c_continued": continued_vectors(),
        "chunking": chunking_vectors(),
        "messages": message_vectors(),
    }
    (HERE / "vectors.json").write_text(json.dumps(vectors, indent=1) + "\n")


if __name__ == "__main__":
    main()
