"""Whole-object checksums whose state survives a gateway restart.

SHA-256 is computed by OpenSSL's libcrypto (the library Python's hashlib already uses), through
its SHA256_Init/Update/Final API, because that API keeps the whole hashing state in a plain
112-byte SHA256_CTX that can be saved after every part and restored after a restart. hashlib
cannot export its state, and the pure-C alternative on PyPI (resumablesha256) is about ten times
slower and holds the GIL while hashing; ctypes releases the GIL, so hashing in a worker thread
does not stall the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

from awscrt import checksums as crt_checksums

_SHA256_CTX_SIZE = 112  # struct SHA256state_st: 8+2+16+2 32-bit words; stable since OpenSSL 0.9.8


def _load_libcrypto() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise RuntimeError("OpenSSL's libcrypto was not found; install libssl3 (or libssl)")
    library = ctypes.CDLL(name)
    library.SHA256_Init.argtypes = [ctypes.c_char_p]
    library.SHA256_Update.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    library.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    for function in (library.SHA256_Init, library.SHA256_Update, library.SHA256_Final):
        function.restype = ctypes.c_int
    return library


_libcrypto = _load_libcrypto()


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (Include/pybuffer.h), for the address of a read-only buffer."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyBUF_SIMPLE = 0  # contiguous bytes, read-only allowed
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


class ResumableSha256:
    """A SHA-256 whose state can be saved with `state()` and restored from it later."""

    def __init__(self, state: bytes | None = None) -> None:
        if state is None:
            self._ctx = ctypes.create_string_buffer(_SHA256_CTX_SIZE)
            if _libcrypto.SHA256_Init(self._ctx) != 1:
                raise RuntimeError("SHA256_Init failed")
        else:
            if len(state) != _SHA256_CTX_SIZE:
                raise ValueError("not a saved SHA-256 state")
            self._ctx = ctypes.create_string_buffer(state, _SHA256_CTX_SIZE)

    def update(self, data: bytes | memoryview) -> None:
        """Hash `data` in place: a memoryview (a message's data inside gRPC's bytes) is read
        where it lies instead of being copied first (bytes() of every chunk cost about half
        of what hashing it does)."""
        if not len(data):
            return
        if isinstance(data, bytes):
            done = _libcrypto.SHA256_Update(self._ctx, data, len(data))
        else:
            view = _PyBuffer()
            if _get_buffer(data, ctypes.byref(view), _PyBUF_SIMPLE) != 0:
                raise RuntimeError("not a contiguous buffer")  # pragma: no cover
            try:
                done = _libcrypto.SHA256_Update(self._ctx, view.buf, view.len)
            finally:
                _release_buffer(ctypes.byref(view))
        if done != 1:
            raise RuntimeError("SHA256_Update failed")

    def state(self) -> bytes:
        return self._ctx.raw

    def digest(self) -> bytes:
        final = ctypes.create_string_buffer(self._ctx.raw, _SHA256_CTX_SIZE)
        out = ctypes.create_string_buffer(32)
        if _libcrypto.SHA256_Final(out, final) != 1:
            raise RuntimeError("SHA256_Final failed")
        return out.raw


def crc32c(data: bytes | memoryview, previous: int = 0) -> int:
    """CRC32C (Castagnoli), continuing from `previous`."""
    return int(crt_checksums.crc32c(data, previous))


def combine_crc32c(first: int, second: int, second_length: int) -> int:
    """The CRC32C of A + B from the CRC32Cs of A and B: no pass over the bytes again."""
    return int(crt_checksums.combine_crc32c(first, second, second_length))


@dataclass(frozen=True)
class DigestState:
    """The whole-object checksums of a prefix of the object, as saved after each part.

    `sha256_state` is empty when the upload does not compute SHA-256.
    """

    crc32c: int
    sha256_state: bytes


def expected_multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the parts' MD5s, dash, part count.

    Holds for objects without SSE-KMS or SSE-C, whose part ETags are their MD5s.
    """
    import hashlib

    joined = b"".join(bytes.fromhex(etag.strip('"')) for etag in part_etags)
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_etags)}"'
