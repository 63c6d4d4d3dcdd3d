"""Where batches, dead letters and damage reports are written.

Every file is written under a temporary name and renamed into place, so a
reader of ``batches/`` never sees half a file. A batch file's name comes
from its key and the position of its first record, so a retried bundle that
writes the same batch again replaces it instead of adding a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from typing import Iterable, Iterator

import apache_beam as beam
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import metrics
from transforms.reader import Damage, DeadLetter
from transforms.records import archive_of, offset_of

__all__ = [
    "BATCHES_DIR",
    "DAMAGE_DIR",
    "DEAD_LETTER_DIR",
    "WriteBatchFiles",
    "WriteDamageReports",
    "WriteDeadLetters",
    "batch_file_name",
    "safe_label",
    "write_atomically",
]

_LOGGER = logging.getLogger(__name__)

BATCHES_DIR = "batches"
DEAD_LETTER_DIR = "dead_letter"
DAMAGE_DIR = "_damage"
TEMP_DIR = "_tmp"

# Longest part of a file name taken from a key; the rest is a digest.
_MAX_LABEL = 60
_UNSAFE = re.compile(r"[^a-z0-9_]+")


def safe_label(key: str) -> str:
    """A file-name-safe label for a key, distinct for distinct keys.

    Only lower-case letters, digits and underscores survive from the key;
    a digest of the exact key keeps keys apart that clean to the same text.
    """
    cleaned = _UNSAFE.sub("_", key.lower()).strip("_")[:_MAX_LABEL] or "_"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned}-{digest}"


def batch_file_name(key: str, first_position: int) -> str:
    archive, offset = archive_of(first_position), offset_of(first_position)
    return f"{safe_label(key)}-a{archive:04d}-{offset:015d}.jsonl.zst"


def join_path(*parts: str) -> str:
    return FileSystems.join(*parts)


def write_atomically(output: str, final_path: str, payload: bytes) -> None:
    """Writes ``payload`` to a temporary file, then renames it into place."""
    temporary = join_path(output, TEMP_DIR, f"{uuid.uuid4().hex}.part")
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


class WriteBatchFiles(beam.DoFn):
    """Writes each batch as one zstd-compressed JSONL file.

    This is the default batch handler: the step a batch is handed to. A
    handler receives (key, records), each record a (position, line) pair,
    and may do with the batch what it likes; ``--batch_handler`` names
    another DoFn class to use instead.
    """

    def __init__(self, output: str, compression_level: int = 3) -> None:
        self._output = output
        self._level = compression_level

    def setup(self) -> None:
        self._compressor = zstandard.ZstdCompressor(level=self._level)

    def process(self, batch: tuple[str, Iterable[tuple[int, bytes]]]) -> Iterator[str]:
        key, records = batch
        records = sorted(records)
        payload = b"".join(line + b"\n" for _, line in records)
        path = join_path(self._output, BATCHES_DIR, batch_file_name(key, records[0][0]))
        write_atomically(self._output, path, self._compressor.compress(payload))
        metrics.BATCHES_WRITTEN.inc()
        metrics.RECORDS_WRITTEN.inc(len(records))
        metrics.BATCH_RECORDS.update(len(records))
        for _, line in records:
            metrics.RECORD_BYTES.update(len(line))
        yield path


def dead_letter_json(letter: DeadLetter) -> bytes:
    """A dead letter as one JSON line; the line's bytes as text, lossless."""
    return json.dumps(
        {
            "archive": letter.archive,
            "offset": letter.offset,
            "reason": letter.reason,
            "length": letter.length,
            "truncated": len(letter.line) < letter.length,
            "line": letter.line.decode("utf-8", errors="backslashreplace"),
        },
        ensure_ascii=False,
    ).encode("utf-8")


class WriteDeadLetters(beam.DoFn):
    """Writes a bundle's dead letters to one JSONL file."""

    def __init__(self, output: str) -> None:
        self._output = output

    def start_bundle(self) -> None:
        self._letters: list[DeadLetter] = []

    def process(self, letter: DeadLetter) -> None:
        self._letters.append(letter)

    def finish_bundle(self) -> None:
        if not self._letters:
            return
        letters = sorted(self._letters, key=lambda letter: (letter.archive, letter.offset))
        first = letters[0]
        name = f"{safe_label(first.archive)}-{first.offset:015d}-{len(letters)}.jsonl"
        payload = b"".join(dead_letter_json(letter) + b"\n" for letter in letters)
        write_atomically(self._output, join_path(self._output, DEAD_LETTER_DIR, name), payload)
        self._letters = []


class WriteDamageReports(beam.DoFn):
    """Writes one JSON file per damaged archive section."""

    def __init__(self, output: str) -> None:
        self._output = output

    def process(self, damage: Damage) -> None:
        name = f"{safe_label(damage.archive)}-{damage.decompressed_offset:015d}.json"
        payload = json.dumps(damage._asdict(), indent=1).encode("utf-8")
        write_atomically(self._output, join_path(self._output, DAMAGE_DIR, name), payload)
