"""The audit trail: one JSON object per line for every credentials call, to its own sink.

The sink is append-only (a file opened with O_APPEND, or stdout) so a SIEM can collect it.
Records name the caller by its configured name and hold no secret: no token, no secret key,
only the masked access key id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_MAX_CLIENT_VALUE = 128


def _clip(value: object) -> object:
    # JSON escaping keeps control characters from breaking the framing; the cap keeps lines short.
    if isinstance(value, str) and len(value) > _MAX_CLIENT_VALUE:
        return value[:_MAX_CLIENT_VALUE] + "..."
    return value


class AuditLog:
    """Writes audit records as JSON lines; `sink` is "stdout", a file path, or "" (off)."""

    def __init__(self, sink: str) -> None:
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._sync = False
        if sink == "stdout":
            self._file = sys.stdout
        elif sink:
            path = Path(sink)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            self._sync = True

    @property
    def enabled(self) -> bool:
        return self._file is not None

    async def record(self, **fields: Any) -> None:
        """Append one record (with the current time); never raises."""
        if self._file is None:
            return
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record = {"time": stamp, **{k: _clip(v) for k, v in fields.items()}}
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
        try:
            await asyncio.to_thread(self._write, line)
        except (OSError, ValueError) as exc:
            log.error("writing an audit record failed (%s)", type(exc).__name__)

    def _write(self, line: str) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(line + "\n")
            self._file.flush()
            if self._sync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None and self._file is not sys.stdout:
                self._file.close()
            self._file = None
