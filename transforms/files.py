"""Small file helpers over Beam's filesystems: atomic writes, position lists."""

from __future__ import annotations

import array
import os
import threading
import time
import uuid
from collections.abc import Iterable

import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

__all__ = [
    "TEMP_DIR",
    "Ledger",
    "decode_positions",
    "encode_positions",
    "join_path",
    "write_atomically",
]

TEMP_DIR = "_tmp"


def join_path(*parts: str) -> str:
    return FileSystems.join(*parts)


def write_atomically(output: str, final_path: str, payload: bytes) -> None:
    """Writes ``payload`` to a temporary file, then renames it into place.

    The temporary file lives in ``OUTPUT/_tmp``, never beside the target, so
    a folder of finished files never holds a partial one.
    """
    name = final_path.rstrip("/").rsplit("/", 1)[-1]
    temporary = join_path(output, TEMP_DIR, f"{uuid.uuid4().hex[:12]}-{name}.part")
    with FileSystems.create(
        temporary, "application/octet-stream", CompressionTypes.UNCOMPRESSED
    ) as handle:
        handle.write(payload)
    if "://" not in final_path:
        # A local rename replaces the target in one step; the folder must exist.
        os.makedirs(os.path.dirname(final_path), exist_ok=True)
        os.replace(temporary, final_path)
        return
    if FileSystems.exists(final_path):
        FileSystems.delete([final_path])
    FileSystems.rename([temporary], [final_path])


def encode_positions(positions: Iterable[int]) -> bytes:
    """Unsigned 64-bit integers, zstd-compressed."""
    return zstandard.ZstdCompressor(level=3).compress(
        array.array("Q", positions).tobytes()
    )


def decode_positions(payload: bytes) -> array.array:
    values = array.array("Q")
    values.frombytes(zstandard.ZstdDecompressor().decompress(payload))
    return values


class Ledger:
    """Rows of integers buffered in memory and written out every few seconds.

    Each flush writes a new file under ``folder``, so nothing is appended
    in place and a reader never sees a half-written file.
    """

    FLUSH_SECS = 5.0

    def __init__(self, output: str, folder: str, fields: int) -> None:
        self._output = output
        self._folder = folder
        self._fields = fields
        self._rows: list[int] = []
        self._last_flush = time.monotonic()
        self._name = uuid.uuid4().hex
        self._sequence = 0
        self._lock = threading.Lock()

    def add(self, *row: int) -> None:
        self._rows.extend(row)
        if time.monotonic() - self._last_flush >= self.FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._rows:
                return
            rows, self._rows = self._rows, []
            self._sequence += 1
            path = join_path(self._folder, f"{self._name}-{self._sequence:06d}.ledger")
        write_atomically(self._output, path, encode_positions(rows))


def read_positions(path: str | None) -> frozenset[int]:
    """The positions stored in a file, or none if there is no such file."""
    if not path or not FileSystems.exists(path):
        return frozenset()
    with FileSystems.open(
        path, compression_type=CompressionTypes.UNCOMPRESSED
    ) as handle:
        return frozenset(decode_positions(handle.read()))
