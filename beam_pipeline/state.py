"""Durable job state, so an interrupted run resumes without loss or doubling.

What is kept, under ``OUTPUT/_state`` (or ``--checkpoint_dir``):

* ``job.json``: a fingerprint of everything that decides which records are
  written and how they are grouped (inputs, filters, fields, batching). A
  rerun with other arguments is refused unless ``--restart`` is given.
* ``written/NAME.pos``: for each batch file, the positions of its records,
  written before the batch file is renamed into ``batches/``, so a batch that
  exists always has its manifest; a manifest whose batch does not exist is
  ignored.
* ``blocks/*.ledger``: for each block of lines parsed, its decompressed range
  and how many matches and dead letters it held, written every few seconds.

On a rerun, a block counts as done when every match and dead letter it held
is on disk. Each archive resumes after the longest run of done blocks from
its start; records past that point that were written anyway (their batch
filled early) are skipped by position. Batches still buffered when the run
died were never written, so they are simply produced again.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.options import OptionError
from transforms.files import decode_positions, encode_positions, write_atomically
from transforms.reader import ArchiveSpec
from transforms.records import LEDGER_EOF, LEDGER_FIELDS, global_position
from transforms.sinks import MANIFEST_DIR

__all__ = [
    "JobLock",
    "ResumePlan",
    "StateStore",
    "job_fingerprint",
]

_LOGGER = logging.getLogger(__name__)

STATE_DIR = "_state"
WRITTEN_DIR = MANIFEST_DIR
LEDGER_DIR = "blocks"
SKIP_FILE = "resume-skip.pos"
REPLAY_FILE = "resume-replay.pos"
JOB_FILE = "job.json"
LOCK_FILE = "lock"


# Outputs a restart removes, beside the state itself.
_OUTPUT_PARTS = (
    "batches",
    "dead_letter",
    "_damage",
    "_tmp",
    "_progress",
    "_summary.json",
)


def job_fingerprint(description: dict) -> str:
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class ResumePlan:
    """Where each archive resumes, and what of it must be produced again.

    ``starts`` is the first line each archive reads. Below ``replay_until``
    only the lines at the positions in the replay file are produced again:
    those the earlier run parsed but whose output never reached disk. From
    ``replay_until`` on everything is read, less the skip file's positions.
    """

    starts: dict[int, int]
    replay_until: dict[int, int]
    finished: set[int]
    replay_count: int
    skip_count: int
    resumed: bool

    def describe(self, archives: list[ArchiveSpec]) -> dict[str, int]:
        return {
            spec.name: self.replay_until[spec.archive_id]
            for spec in archives
            if self.replay_until.get(spec.archive_id)
        }


def _list(pattern: str) -> list[str]:
    return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)


def _read(path: str) -> bytes:
    with FileSystems.open(
        path, compression_type=CompressionTypes.UNCOMPRESSED
    ) as handle:
        return handle.read()


def _delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


class JobLock:
    """Keeps a second run off the same output while this one runs.

    On a local folder the lock is an advisory file lock, released by the
    system when the process dies. On a remote filesystem it is a file that
    the holder rewrites every ``HEARTBEAT_SECS``; one not rewritten for
    ``STALE_SECS`` is taken to belong to a dead run.
    """

    HEARTBEAT_SECS = 30.0
    STALE_SECS = 180.0

    def __init__(self, state_dir: str) -> None:
        self._path = FileSystems.join(state_dir, LOCK_FILE)
        self._handle = None
        self._stop: threading.Event | None = None

    def acquire(self, output: str) -> None:
        if "://" in self._path:
            self._acquire_remote(output)
            return
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        handle = open(self._path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OptionError(
                f"--output {output!r} is in use by another run ({holder});"
                " wait for it to finish or choose another --output"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(self._holder_text())
        handle.flush()
        self._handle = handle

    def _holder_text(self) -> str:
        return f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}"

    def _acquire_remote(self, output: str) -> None:
        if FileSystems.exists(self._path):
            holder = json.loads(_read(self._path))
            if time.time() - holder.get("heartbeat", 0) < self.STALE_SECS:
                raise OptionError(
                    f"--output {output!r} is in use by another run ({holder.get('holder')});"
                    " wait for it to finish or choose another --output"
                )
        self._stop = threading.Event()
        self._beat()
        threading.Thread(
            target=self._beat_forever, name="job-lock", daemon=True
        ).start()

    def _beat(self) -> None:
        payload = json.dumps({"holder": self._holder_text(), "heartbeat": time.time()})
        with FileSystems.create(self._path) as handle:
            handle.write(payload.encode("utf-8"))

    def _beat_forever(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.HEARTBEAT_SECS):
            with contextlib.suppress(Exception):
                self._beat()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            _delete([self._path])
            self._stop = None
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class StateStore:
    """The state folder of one output."""

    def __init__(self, output: str, checkpoint_dir: str | None = None) -> None:
        self.output = output
        self.folder = checkpoint_dir or FileSystems.join(output, STATE_DIR)

    @property
    def written_dir(self) -> str:
        return FileSystems.join(self.folder, WRITTEN_DIR)

    @property
    def ledger_dir(self) -> str:
        return FileSystems.join(self.folder, LEDGER_DIR)

    @property
    def skip_path(self) -> str:
        return FileSystems.join(self.folder, SKIP_FILE)

    @property
    def replay_path(self) -> str:
        return FileSystems.join(self.folder, REPLAY_FILE)

    def _write(self, path: str, payload: bytes) -> None:
        write_atomically(self.output, path, payload)

    def lock(self) -> JobLock:
        return JobLock(self.folder)

    def restart(self) -> None:
        """Removes the state and everything an earlier run wrote."""
        parts = [FileSystems.join(self.output, part) for part in _OUTPUT_PARTS]
        parts += [
            FileSystems.join(self.folder, name)
            for name in (WRITTEN_DIR, LEDGER_DIR, SKIP_FILE, REPLAY_FILE, JOB_FILE)
        ]
        for path in parts:
            if "://" in path:
                _delete(_list(path + "*"))
            elif os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)

    def check_fingerprint(self, description: dict, restart: bool) -> bool:
        """Records the job's arguments; returns whether earlier state exists.

        Raises OptionError when earlier state is for other arguments.
        """
        path = FileSystems.join(self.folder, JOB_FILE)
        fingerprint = job_fingerprint(description)
        if restart:
            self.restart()
        elif FileSystems.exists(path):
            earlier = json.loads(_read(path))
            if earlier.get("fingerprint") != fingerprint:
                changed = sorted(
                    name
                    for name in set(earlier.get("job", {})) | set(description)
                    if earlier.get("job", {}).get(name) != description.get(name)
                )
                raise OptionError(
                    f"--output {self.output!r} holds a run with other arguments"
                    f" ({', '.join(changed)} differ); rerun with the same arguments"
                    " to resume it, add --restart to discard it, or choose another --output"
                )
            return True
        elif _has_output(self.output):
            raise OptionError(
                f"--output {self.output!r} already holds output without job state;"
                " add --restart to replace it or choose another --output"
            )
        record = {"fingerprint": fingerprint, "job": description}
        self._write(path, json.dumps(record, indent=1).encode("utf-8"))
        return False

    def plan(self, archives: list[ArchiveSpec]) -> ResumePlan:
        """Works out where each archive resumes from what is on disk."""
        written = self._written_positions()
        written.extend(self._dead_letter_positions(archives))
        written.sort()
        ledger = self._ledger()

        starts: dict[int, int] = {}
        until: dict[int, int] = {}
        finished: set[int] = set()
        replay: list[int] = []
        skip: list[int] = []
        for spec in archives:
            first = global_position(spec.archive_id, 0)
            covered, at_end, parsed = _coverage(ledger.get(spec.archive_id, ([], [])))
            boundary = global_position(spec.archive_id, covered)
            low = bisect.bisect_left(written, first)
            middle = bisect.bisect_left(written, boundary)
            high = bisect.bisect_left(written, global_position(spec.archive_id + 1, 0))
            on_disk = set(written[low:middle])
            again = sorted(
                {
                    offset
                    for offset in parsed
                    if offset < covered and first + offset not in on_disk
                }
            )
            if at_end and not again:
                finished.add(spec.archive_id)
            starts[spec.archive_id] = again[0] if again else covered
            until[spec.archive_id] = covered
            replay.extend(first + offset for offset in again)
            skip.extend(written[middle:high])

        self._write(self.skip_path, encode_positions(skip))
        self._write(self.replay_path, encode_positions(replay))
        resumed = bool(written) or any(until.values())
        return ResumePlan(starts, until, finished, len(replay), len(skip), resumed)

    def _written_positions(self) -> list[int]:
        """Positions of records in finished batches; drops orphan manifests."""
        batches = FileSystems.join(self.output, "batches", "*.jsonl.zst")
        existing = {path.rsplit("/", 1)[-1] for path in _list(batches)}
        positions: list[int] = []
        orphans = []
        for manifest in _list(FileSystems.join(self.written_dir, "*.pos")):
            name = manifest.rsplit("/", 1)[-1][: -len(".pos")]
            if not name.startswith("handed-") and name not in existing:
                # Written before a batch that never reached batches/.
                orphans.append(manifest)
                continue
            positions.extend(decode_positions(_read(manifest)))
        _delete(orphans)
        return positions

    def _dead_letter_positions(self, archives: list[ArchiveSpec]) -> list[int]:
        ids = {spec.name: spec.archive_id for spec in archives}
        positions = []
        for path in _list(FileSystems.join(self.output, "dead_letter", "*.jsonl")):
            for line in _read(path).splitlines():
                letter = json.loads(line)
                if letter["archive"] in ids:
                    positions.append(
                        global_position(ids[letter["archive"]], letter["offset"])
                    )
        return positions

    def _ledger(self) -> dict[int, tuple[list, list[int]]]:
        """Per archive: (start, end, flags) of each parsed block, and the
        offsets of every match and dead letter the blocks held."""
        by_archive: dict[int, tuple[list, list[int]]] = {}
        for path in _list(FileSystems.join(self.ledger_dir, "*.ledger")):
            values = decode_positions(_read(path))
            position = 0
            while position + LEDGER_FIELDS <= len(values):
                archive, start, end, matched, dead, flags = values[
                    position : position + LEDGER_FIELDS
                ]
                position += LEDGER_FIELDS
                blocks, offsets = by_archive.setdefault(archive, ([], []))
                blocks.append((start, end, flags))
                offsets.extend(values[position : position + matched + dead])
                position += matched + dead
        return by_archive


def _coverage(ledger: tuple[list, list[int]]) -> tuple[int, bool, list[int]]:
    """How far the parsed blocks reach without a gap from the archive's
    start, whether that reaches its end marker, and the parsed offsets."""
    blocks, offsets = ledger
    covered = 0
    at_end = False
    for start, end, flags in sorted(blocks):
        if start > covered:
            break
        if flags & LEDGER_EOF:
            at_end = True
            break
        covered = max(covered, end)
    return covered, at_end, offsets


def _has_output(output: str) -> bool:
    pattern = FileSystems.join(output, "batches", "*")
    with contextlib.suppress(Exception):
        return bool(FileSystems.match([pattern])[0].metadata_list)
    return False
