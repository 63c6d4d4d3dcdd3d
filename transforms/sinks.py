"""Where batches, dead letters and damage reports are written.

Every file is written under a temporary name and renamed into place, so a
reader of ``batches/`` never sees half a file. A batch file's name comes
from its key and the position of its first record, so a retried bundle that
writes the same batch again replaces it instead of adding a copy.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator

import apache_beam as beam
import zstandard

from transforms import metrics
from transforms.files import encode_positions, join_path, write_atomically
from transforms.reader import Damage, DeadLetter
from transforms.records import archive_of, offset_of

__all__ = [
    "BATCHES_DIR",
    "BatchHandler",
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
# Under the state folder: which positions each handed-on batch held.
MANIFEST_DIR = "written"

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


class BatchHandler(beam.DoFn):
    """The step a batch is handed to; subclass it to plug in another.

    A handler receives (key, records), each record a (position, line) pair
    sorted by position, in ``hand_on``. After ``hand_on`` returns, the base
    class notes the batch's positions in the job state, so a resumed run
    does not hand those records on again; a batch whose ``hand_on`` was cut
    short by a crash is handed on again, so a handler that writes elsewhere
    should be idempotent per batch (``batch_id`` is stable across runs).
    ``--batch_handler module:Class`` selects a subclass; it is built with
    the output folder and the state folder.
    """

    def __init__(self, output: str, state_dir: str | None = None) -> None:
        self._output = output
        self._state_dir = state_dir

    def hand_on(
        self, batch_id: str, key: str, records: list[tuple[int, bytes]]
    ) -> None:
        raise NotImplementedError

    # Whether the manifest must exist before the batch can be seen: true for
    # handlers whose output shows the batch is finished (the file writer).
    manifest_first = False

    def process(self, batch: tuple[str, Iterable[tuple[int, bytes]]]) -> Iterator[str]:
        key, records = batch
        records = sorted(records)
        batch_id = batch_file_name(key, records[0][0])
        if self.manifest_first:
            self._note_handed_on(batch_id, records)
            self.hand_on(batch_id, key, records)
        else:
            self.hand_on(batch_id, key, records)
            self._note_handed_on(f"handed-{batch_id}", records)
        metrics.BATCHES_WRITTEN.inc()
        metrics.RECORDS_WRITTEN.inc(len(records))
        metrics.BATCH_RECORDS.update(len(records))
        yield batch_id

    def _note_handed_on(self, name: str, records: list[tuple[int, bytes]]) -> None:
        if self._state_dir:
            manifest = join_path(self._state_dir, MANIFEST_DIR, f"{name}.pos")
            positions = encode_positions(position for position, _ in records)
            write_atomically(self._output, manifest, positions)


class WriteBatchFiles(BatchHandler):
    """Writes each batch as one zstd-compressed JSONL file: the default handler.

    The batch's manifest is written before the batch file is renamed into
    ``batches/``, so every batch file there has one; a manifest without its
    batch file belongs to a batch that was never finished.

    Batches are compressed and written in a thread of their own, which
    python-zstandard lets run beside the parsing thread, a few batches
    behind it; the bundle ends only when all of its batches are written,
    and a failed write fails the bundle.
    """

    manifest_first = True
    # Uncompressed bytes of batches waiting for the writer thread, beyond
    # which handing on waits; one batch is always let through.
    max_pending_bytes = 64 * 2**20

    def __init__(
        self, output: str, state_dir: str | None = None, compression_level: int = 3
    ) -> None:
        super().__init__(output, state_dir)
        self._level = compression_level

    def setup(self) -> None:
        # Used by the writer thread only: a compressor is not shared.
        self._compressor = zstandard.ZstdCompressor(level=self._level)
        self._writer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="batch-writer"
        )
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0

    def hand_on(
        self, batch_id: str, key: str, records: list[tuple[int, bytes]]
    ) -> None:
        # One copy of the lines: the empty last item gives the final newline.
        lines = [line for _, line in records]
        lines.append(b"")
        payload = b"\n".join(lines)
        path = join_path(self._output, BATCHES_DIR, batch_id)
        while self._pending and (
            self._pending_bytes + len(payload) > self.max_pending_bytes
            or self._pending[0][0].done()
        ):
            self._wait_oldest()
        future = self._writer.submit(self._write, path, payload)
        self._pending.append((future, len(payload)))
        self._pending_bytes += len(payload)
        for _, line in records:
            metrics.RECORD_BYTES.update(len(line))

    def _write(self, path: str, payload: bytes) -> None:
        write_atomically(self._output, path, self._compressor.compress(payload))

    def _wait_oldest(self) -> None:
        """Waits for the oldest pending batch; raises what its write raised."""
        future, size = self._pending.popleft()
        self._pending_bytes -= size
        future.result()

    def finish_bundle(self) -> None:
        while self._pending:
            self._wait_oldest()

    def teardown(self) -> None:
        # Writes of a bundle that failed finish, or fail, unwatched.
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.shutdown(wait=True)


def dead_letter_json(letter: DeadLetter) -> bytes:
    """A dead letter as one JSON line.

    ``line`` is the line as text, bytes that are not UTF-8 written as
    ``\\xNN``; such a line also carries its exact bytes in ``line_base64``,
    since the text alone cannot tell them from a backslash in the record.
    """
    fields = {
        "archive": letter.archive,
        "offset": letter.offset,
        "reason": letter.reason,
        "length": letter.length,
        "truncated": len(letter.line) < letter.length,
        "line": letter.line.decode("utf-8", errors="backslashreplace"),
    }
    try:
        letter.line.decode("utf-8")
    except UnicodeDecodeError:
        fields["line_base64"] = base64.b64encode(letter.line).decode("ascii")
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


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
        letters = sorted(
            self._letters, key=lambda letter: (letter.archive, letter.offset)
        )
        first = letters[0]
        payload = b"".join(dead_letter_json(letter) + b"\n" for letter in letters)
        # The digest keeps apart bundles that start alike, such as those of
        # two archives of one name in two folders.
        digest = hashlib.sha256(payload).hexdigest()[:12]
        name = f"{safe_label(first.archive)}-{first.offset:015d}-{len(letters)}-{digest}.jsonl"
        write_atomically(
            self._output, join_path(self._output, DEAD_LETTER_DIR, name), payload
        )
        self._letters = []


class WriteDamageReports(beam.DoFn):
    """Writes one JSON file per damaged archive section."""

    def __init__(self, output: str) -> None:
        self._output = output

    def process(self, damage: Damage) -> None:
        # The path too: archives of one name in two folders are two reports.
        label = safe_label(f"{damage.archive} {damage.path}")
        name = f"{label}-{damage.decompressed_offset:015d}.json"
        payload = json.dumps(damage._asdict(), indent=1).encode("utf-8")
        write_atomically(
            self._output, join_path(self._output, DAMAGE_DIR, name), payload
        )
