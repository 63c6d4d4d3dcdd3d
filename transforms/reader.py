"""The splittable DoFn that streams an archive's lines in blocks.

It decompresses with python-zstandard in bounded reads, cuts the output at
line ends and emits blocks of whole lines with the decompressed offset of
their first byte. Parsing happens downstream, after a fan-out, so one core
decompressing can feed several cores parsing.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import apache_beam as beam
import numpy
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration

from transforms import metrics, progress
from transforms.files import read_positions
from transforms.memory import MemoryGuard
from transforms.positions import global_position, offset_of
from transforms.restriction import (
    END_OF_ARCHIVE,
    ArchiveRestriction,
    ArchiveRestrictionCoder,
    ArchiveTracker,
    estimated_size,
)
from transforms.zstd_frames import (
    MAX_WINDOW_SIZE,
    ArchiveDamage,
    FrameIndex,
    FrameWalker,
    build_frame_index,
)

__all__ = [
    "ArchiveSpec",
    "Damage",
    "DeadLetter",
    "LineBlock",
    "ReadArchiveBlocks",
    "ReaderConfig",
    "archive_index",
]

_LOGGER = logging.getLogger(__name__)

DAMAGE_TAG = "damage"
DEAD_LETTER_TAG = "dead_letter"

# Bytes of an oversized line kept in its dead letter.
DEAD_LETTER_PREVIEW_BYTES = 4096
# Decompressed bytes sampled to estimate the compression ratio of an archive
# that stores no content size.
_RATIO_SAMPLE_BYTES = 4 * 2**20
# Lines over which the share of lines that are not JSON objects is judged,
# and the fewest judged when an archive ends before a whole window.
_JUDGE_LINES = 1000
_JUDGE_FINAL_LINES = 100
# Bytes at the start of each block whose lines are judged.
_JUDGE_SAMPLE_BYTES = 64 * 2**10
_NEWLINE = 0x0A
# Decompressed bytes asked of the decoder at a time while salvaging: the
# output of one zstd block, whose largest size RFC 8878 sets at 128 KiB.
_SALVAGE_READ_BYTES = 128 * 2**10


class ArchiveSpec(NamedTuple):
    """One input archive, as matched when the pipeline was built."""

    archive_id: int
    path: str
    size: int
    # Where a resumed run starts: a line start in decompressed bytes.
    start: int = 0
    # Below this offset a resumed run emits only the lines it replays.
    replay_until: int = 0

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


class LineBlock(NamedTuple):
    """Whole lines of one archive; ``offset`` is where ``data`` starts."""

    archive_id: int
    offset: int
    data: bytes


class DeadLetter(NamedTuple):
    """A line that is not a usable record, and why."""

    archive: str
    offset: int
    reason: str
    line: bytes
    length: int


class Damage(NamedTuple):
    """Where an archive stopped being readable."""

    archive: str
    path: str
    compressed_offset: int
    decompressed_offset: int
    reason: str


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """Sizes that bound what the reader holds in memory."""

    read_chunk_bytes: int = 2**20
    block_bytes: int = 2**20
    max_record_bytes: int = 64 * 2**20
    desired_split_bytes: int = 0
    max_memory_bytes: int = 0
    memory_retry_secs: float = 5.0
    # How long a reader waits in place for memory before it defers; inf on
    # the FnApiRunner, which loses deferred work when it has several workers.
    memory_wait_secs: float = 1.0
    max_bad_line_share: float = 0.5
    memory_ledger_key: str = "default"
    # Positions a resumed run produces again below each archive's
    # ``replay_until`` (see beam_pipeline/state.py).
    replay_path: str = ""
    progress_dir: str = ""
    progress_interval_secs: float = 10.0
    # Names one run of the job, so a process that runs several starts each
    # one's progress from zero.
    run_id: str = ""
    read_ahead_blocks: int = 2


def _is_plain(path: str) -> bool:
    return not path.lower().endswith(".zst")


def _open_raw(path: str) -> BinaryIO:
    return FileSystems.open(
        path, "application/octet-stream", CompressionTypes.UNCOMPRESSED
    )


_INDEX_LOCK = threading.Lock()


@functools.lru_cache(maxsize=256)
def _cached_index(path: str, size: int) -> FrameIndex:
    if _is_plain(path):
        return FrameIndex((0,), (0,), size, size, 0, "plain")
    with _open_raw(path) as handle:
        index = build_frame_index(handle, size)
        if index.decompressed_size is not None:
            return index
        handle.seek(0)
        ratio = _sample_ratio(handle, size)
    return dataclasses.replace(index, ratio_estimate=ratio)


def archive_index(path: str, size: int) -> FrameIndex:
    """The frame index of an archive, built once per worker process."""
    with _INDEX_LOCK:
        return _cached_index(path, size)


def _sample_ratio(handle: BinaryIO, size: int) -> float:
    """Decompressed bytes per compressed byte over the archive's start."""
    counter = _CountingReader(handle, None)
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    produced = 0
    try:
        with decompressor.stream_reader(
            counter, read_size=65536, closefd=False
        ) as stream:
            while produced < _RATIO_SAMPLE_BYTES:
                chunk = stream.read(65536)
                if not chunk:
                    break
                produced += len(chunk)
    except zstandard.ZstdError:
        pass
    if counter.position == 0 or produced == 0:
        return 1.0
    if counter.position >= size:
        return produced / size
    return produced / counter.position


class _CountingReader:
    """A file wrapper that counts compressed bytes and walks frame headers.

    With ``one_unit`` set, each read stops at the end of the frame header,
    block or checksum being read, so that a decoder fed from it decodes one
    block per call.
    """

    def __init__(
        self,
        handle: BinaryIO,
        walker: FrameWalker | None,
        start: int = 0,
        one_unit: bool = False,
    ) -> None:
        self._handle = handle
        self.walker = walker
        self.start = start
        self.position = start
        self.damage: ArchiveDamage | None = None
        self.unit_offset = start
        self._one_unit = one_unit
        self._padded = False

    def read(self, size: int = -1) -> bytes:
        if self.damage is not None:
            return self._end()
        if self._one_unit and self.walker is not None:
            # All but the last byte of a unit first: the decoder can then
            # flush what it holds before the byte that lets it decode (and
            # perhaps fail on) the unit, a call whose output would be lost.
            remaining = self.walker.unit_remaining
            part = remaining - 1 if remaining > 1 else remaining
            size = part if size < 0 else min(size, part)
            self.unit_offset = self.walker.unit_offset
        data = self._handle.read(size)
        if self.walker is not None and data:
            try:
                self.walker.feed(data)
            except ArchiveDamage as exc:
                # Stop the decoder at the damage; what came before is
                # decoded and emitted, the rest of the archive is not.
                self.damage = exc
                keep = max(0, exc.compressed_offset - self.position)
                data = data[:keep]
                if not data:
                    return self._end()
        if not data:
            return self._end()
        self.position += len(data)
        return data

    def _end(self) -> bytes:
        """Ends the input, first letting the decoder flush what it holds.

        python-zstandard's C decoder calls libzstd only while input is left,
        so when the input stops exactly after a block of an unfinished frame
        (a truncated or damaged archive), the part of that block's output
        that did not fit the last read would be lost. One byte more, which
        cannot complete the block header or checksum that comes next, makes
        it flush; the byte itself is never decoded.
        """
        walker = self.walker
        if self._padded or walker is None or not walker.at_block_boundary:
            return b""
        self._padded = True
        return b"\x00"

    def readable(self) -> bool:
        return True


def _newlines(data: bytes) -> int:
    """How many newlines ``data`` holds, at about three times bytes.count's speed.

    Counted for every decompressed byte, for the progress figures;
    ``bytes.count`` compares byte by byte, numpy in wide registers.
    """
    return int(
        numpy.count_nonzero(numpy.frombuffer(data, dtype=numpy.uint8) == _NEWLINE)
    )


class _ReadAhead:
    """Decodes the next blocks in a thread of its own while lines are parsed.

    python-zstandard releases the GIL while libzstd decodes, which is a
    quarter of the work of reading and parsing an archive; decoded ahead in
    a thread, it runs on a second core beside the parsing. At most ``depth``
    decoded blocks wait in the queue. Only the thread touches the stream;
    Beam metrics and the tracker stay with the caller, whose thread Beam
    set up for them.
    """

    def __init__(
        self, stream, counter: _CountingReader, chunk_bytes: int, depth: int
    ) -> None:
        self._stream = stream
        self._counter = counter
        self._chunk_bytes = chunk_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._position = counter.position
        self._thread = threading.Thread(
            target=self._decode, name="zstd-read-ahead", daemon=True
        )
        self._thread.start()

    def _decode(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._stream.read(self._chunk_bytes)
                if not self._put((chunk, self._counter.position, None)) or not chunk:
                    return
        except Exception as exc:  # Raised again in the reading thread.
            self._put((b"", self._counter.position, exc))

    def _put(self, item: tuple) -> bool:
        """Queues an item; False once the reader has stopped listening."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[bytes, int]:
        """The next decoded bytes and the compressed position after them.

        Empty bytes at the end; raises what decoding raised.
        """
        if self._ended:
            return b"", self._position
        chunk, self._position, error = self._queue.get()
        if error is not None or not chunk:
            self._ended = True
            self._thread.join()
        if error is not None:
            raise error
        return chunk, self._position

    def close(self) -> None:
        """Stops the thread and waits for it, so the file can be closed."""
        self._stop.set()
        self._thread.join()


class _ArchiveRestrictions(RestrictionProvider):
    """Restrictions over an archive's decompressed offsets."""

    def __init__(self, config: ReaderConfig) -> None:
        self._config = config

    def initial_restriction(self, element: ArchiveSpec) -> ArchiveRestriction:
        index = archive_index(element.path, element.size)
        stop = (
            index.decompressed_size
            if index.decompressed_size is not None
            else END_OF_ARCHIVE
        )
        return ArchiveRestriction(element.path, min(element.start, stop), stop)

    def create_tracker(self, restriction: ArchiveRestriction) -> ArchiveTracker:
        index = archive_index(restriction.path, _size_of(restriction.path))
        return ArchiveTracker(
            restriction, index, read_bytes=self._config.read_chunk_bytes
        )

    def split(self, element: ArchiveSpec, restriction: ArchiveRestriction):
        desired = self._config.desired_split_bytes
        index = archive_index(element.path, element.size)
        if desired <= 0 or not restriction.bounded:
            yield restriction
            return
        if index.source == "plain":
            boundaries = list(range(restriction.start, restriction.stop, desired))[1:]
        elif index.splittable:
            boundaries = _spaced(index.decompressed_offsets, restriction, desired)
        else:
            boundaries = []
        start = restriction.start
        for boundary in boundaries:
            yield ArchiveRestriction(restriction.path, start, boundary)
            start = boundary
        yield ArchiveRestriction(restriction.path, start, restriction.stop)

    def restriction_size(
        self, element: ArchiveSpec, restriction: ArchiveRestriction
    ) -> int:
        return estimated_size(archive_index(element.path, element.size), restriction)

    def restriction_coder(self) -> ArchiveRestrictionCoder:
        return ArchiveRestrictionCoder()


def _spaced(offsets, restriction: ArchiveRestriction, desired: int) -> list[int]:
    """Frame boundaries inside a restriction, about ``desired`` bytes apart."""
    chosen = []
    last = restriction.start
    for offset in offsets:
        if offset <= restriction.start or offset >= restriction.stop:
            continue
        if offset - last >= desired:
            chosen.append(offset)
            last = offset
    return chosen


@functools.lru_cache(maxsize=64)
def _replay_offsets(path: str, archive_id: int) -> list[int]:
    """Sorted offsets of one archive's lines that a resumed run replays."""
    first, last = global_position(archive_id, 0), global_position(archive_id + 1, 0)
    return sorted(
        offset_of(position)
        for position in read_positions(path)
        if first <= position < last
    )


@functools.lru_cache(maxsize=256)
def _size_of(path: str) -> int:
    """An archive's size; its path is a name, never matched as a glob."""
    if "://" not in path:
        return os.path.getsize(path)
    with FileSystems.open(
        path, "application/octet-stream", CompressionTypes.UNCOMPRESSED
    ) as handle:
        handle.seek(0, os.SEEK_END)
        return handle.tell()


class ReadArchiveBlocks(beam.DoFn, RestrictionProvider):
    """Emits ``LineBlock``s of an archive's lines, one restriction at a time.

    Outputs tagged ``dead_letter`` carry lines too long to hold; outputs
    tagged ``damage`` say where an archive stopped being readable.

    The DoFn is its own restriction provider, delegating to one built from
    its config: Beam takes the provider from ``process``'s default argument,
    which is fixed when the class is defined, so a provider given there
    would never see this instance's ``desired_split_bytes``.
    """

    def __init__(self, config: ReaderConfig, archive_names: dict[int, str]) -> None:
        self._config = config
        self._names = archive_names
        self._provider = _ArchiveRestrictions(config)

    def initial_restriction(self, element: ArchiveSpec) -> ArchiveRestriction:
        return self._provider.initial_restriction(element)

    def create_tracker(self, restriction: ArchiveRestriction) -> ArchiveTracker:
        return self._provider.create_tracker(restriction)

    def split(self, element: ArchiveSpec, restriction: ArchiveRestriction):
        return self._provider.split(element, restriction)

    def restriction_size(
        self, element: ArchiveSpec, restriction: ArchiveRestriction
    ) -> int:
        return self._provider.restriction_size(element, restriction)

    def restriction_coder(self) -> ArchiveRestrictionCoder:
        return self._provider.restriction_coder()

    def setup(self) -> None:
        config = self._config
        self._guard = MemoryGuard.for_worker(
            config.max_memory_bytes, config.memory_ledger_key
        )
        progress.configure(
            config.progress_dir, config.progress_interval_secs, config.run_id
        )
        progress.start_reporter()

    def process(
        self,
        element: ArchiveSpec,
        tracker=beam.DoFn.RestrictionParam(),
    ) -> Iterator:
        restriction: ArchiveRestriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        index = archive_index(element.path, element.size)
        config = self._config
        need = self._guard.decoder_cost(
            index,
            config.read_chunk_bytes,
            config.block_bytes,
            config.max_record_bytes,
            config.read_ahead_blocks,
        )
        stats = progress.archive_stats(element.name, element.size)

        def waiting() -> None:
            stats.defer()
            progress.flush()

        # Waiting a moment in place first keeps a runner that resumes
        # deferred work at once from spinning.
        reservation = self._guard.try_reserve(
            need, element.name, wait_secs=config.memory_wait_secs, on_wait=waiting
        )
        if reservation is None:
            tracker.defer_remainder(Duration(seconds=config.memory_retry_secs))
            return
        end = (
            index.decompressed_size
            if index.decompressed_size is not None
            else END_OF_ARCHIVE
        )
        stats.begin(whole=restriction.start == 0 and restriction.stop >= end)
        # Memory reaches the metrics at least once per pass, however short.
        self._guard.sample()
        try:
            yield from _Pass(
                element, index, restriction, tracker, self._config, self._guard
            ).run()
        finally:
            # _Pass.run has dropped the decoder by now, so the memory the
            # reservation stood for is free when it is released.
            reservation.release()
            stats.end()
            progress.flush()


class _Pass:
    """One reading of one restriction: skip to the start, emit, stop."""

    def __init__(self, element, index, restriction, tracker, config, guard) -> None:
        self.element = element
        self.index = index
        self.restriction = restriction
        self.tracker = tracker
        self.config = config
        self.guard = guard
        self.stats = progress.archive_stats(element.name, element.size)
        self.decode_error: str | None = None
        self.decode_error_offset: int | None = None
        self.verdict: str | None = None
        self._ahead: _ReadAhead | None = None
        self._window_lines = 0
        self._window_bad = 0

    def run(self) -> Iterator:
        start = self.restriction.start
        if self.index.source == "plain":
            compressed_start = position = max(start - 1, 0)
        else:
            frame = self.index.frame_containing(max(start - 1, 0))
            compressed_start = self.index.compressed_offsets[frame]
            position = self.index.decompressed_offsets[frame]

        handle = _open_raw(self.element.path)
        try:
            handle.seek(compressed_start)
            if self.index.source == "plain":
                self.counter = _CountingReader(handle, None, compressed_start)
                self.stream = self.counter
            else:
                walker = FrameWalker(compressed_start, self.index.frame_sizes())
                self.counter = _CountingReader(handle, walker, compressed_start)
                decompressor = zstandard.ZstdDecompressor(
                    max_window_size=MAX_WINDOW_SIZE
                )
                # Kept so that a salvage after a decode error reuses its window.
                self.decompressor = decompressor
                self.stream = decompressor.stream_reader(
                    self.counter,
                    read_size=self.config.read_chunk_bytes,
                    read_across_frames=True,
                )
                if self.config.read_ahead_blocks > 0:
                    self._ahead = _ReadAhead(
                        self.stream,
                        self.counter,
                        self.config.block_bytes,
                        self.config.read_ahead_blocks,
                    )
            self._last_compressed = compressed_start
            yield from self._read(position, start)
        finally:
            if self._ahead is not None:
                self._ahead.close()
            handle.close()
            # The decoder's window is freed only with the decompressor; drop
            # every reference now, even when an exception's traceback keeps
            # this frame alive, so the memory guard's release is true.
            self.stream = self.decompressor = decompressor = self._ahead = None  # noqa: F841

    def _next_chunk(self) -> bytes:
        """The next decompressed bytes; empty at the end or at damage."""
        if self.decode_error is not None:
            return b""
        try:
            if self._ahead is not None:
                chunk, position = self._ahead.next()
            else:
                chunk = self.stream.read(self.config.block_bytes)
                position = self.counter.position
        except zstandard.ZstdError as exc:
            self.decode_error = f"zstd could not decode the archive: {exc}"
            chunk = self._salvage()
            position = self.counter.position
            if not chunk:
                return b""
        compressed = position - self._last_compressed
        self._last_compressed = position
        metrics.COMPRESSED_BYTES.inc(compressed)
        metrics.DECOMPRESSED_BYTES.inc(len(chunk))
        name = self.element.name
        metrics.archive_counter("compressed_bytes_read", name).inc(compressed)
        metrics.archive_counter("decompressed_bytes_read", name).inc(len(chunk))
        self.stats.advance(compressed, len(chunk), position, _newlines(chunk))
        self.guard.throttle()
        return chunk

    def _salvage(self) -> bytes:
        """What the failed read had decoded before the part that failed.

        python-zstandard drops everything a read decoded when the read
        fails, so a corrupt block or a wrong checksum would cost up to
        ``block_bytes`` of good lines before it. This decodes the pass's
        frames again from where the pass started, with the same decoder and
        so no more memory, skips what was handed on and then feeds one zstd
        block per decoder call: the call that fails holds only the bad
        block. It costs a second decompression of what the pass had read,
        once per damaged archive. Also records where decoding failed.
        """
        delivered = self.stream.tell()
        limit = self.config.block_bytes
        start = self.counter.start
        _LOGGER.warning(
            "%s: decoding failed after decompressed byte %d; decoding it again from"
            " compressed byte %d to keep the lines before the bad block",
            self.element.name,
            delivered,
            start,
        )
        parts: list[bytes] = []
        salvaged = skipped = 0
        try:
            handle = _open_raw(self.element.path)
        except OSError as exc:
            _LOGGER.warning(
                "%s: could not reopen to salvage lines: %s", self.element.name, exc
            )
            return b""
        try:
            handle.seek(start)
            counter = _CountingReader(handle, FrameWalker(start), start, one_unit=True)
            stream = self.decompressor.stream_reader(
                counter, read_size=_SALVAGE_READ_BYTES, read_across_frames=True
            )
            while skipped < delivered:
                chunk = stream.read(min(delivered - skipped, limit))
                if not chunk:
                    return b""
                skipped += len(chunk)
            # The failed read returned nothing, so what it had decoded before
            # the bad block is less than ``limit``; reaching it means the
            # error did not happen again, and the salvage ends there.
            while salvaged < limit:
                chunk = stream.read1(min(_SALVAGE_READ_BYTES, limit - salvaged))
                if not chunk:
                    break
                parts.append(chunk)
                salvaged += len(chunk)
        except zstandard.ZstdError:
            if skipped >= delivered:
                self.decode_error_offset = counter.unit_offset
        except OSError as exc:
            _LOGGER.warning("%s: could not salvage lines: %s", self.element.name, exc)
        finally:
            handle.close()
        return b"".join(parts)

    def _damage(self) -> str | None:
        """Why the stream ended early, or None if it ended cleanly."""
        if self.decode_error is not None:
            return self.decode_error
        if self.counter.damage is not None:
            return str(self.counter.damage)
        walker = self.counter.walker
        if walker is not None:
            try:
                walker.finish()
            except ArchiveDamage as exc:
                return str(exc)
            if walker.offset == 0:
                # Not a valid zstd stream, and most often a failed download.
                return (
                    "the archive is empty: a .zst file of 0 bytes holds no zstd frame"
                )
        return None

    def _read(self, position: int, start: int) -> Iterator:
        max_record = self.config.max_record_bytes

        pending = b""
        line_start = start
        if start > 0:
            skipped = yield from self._skip_to_line(position, start)
            if skipped is None:
                return
            pending, line_start = skipped

        # The unfinished line, kept as the pieces it arrived in so that a
        # long line is joined once, not copied again with every chunk; it
        # never holds a newline.
        parts = [pending] if pending else []
        parts_size = len(pending)
        while True:
            chunk = self._next_chunk()
            if not chunk:
                break
            cut = chunk.rfind(b"\n")
            if cut < 0:
                parts.append(chunk)
                parts_size += len(chunk)
                if parts_size > max_record:
                    outcome = yield from self._oversized(b"".join(parts), line_start)
                    if outcome is None:
                        return
                    pending, line_start = outcome
                    parts = [pending] if pending else []
                    parts_size = len(pending)
                continue
            block_start = line_start
            if parts:
                block = b"".join((*parts, memoryview(chunk)[: cut + 1]))
            else:
                block = chunk[: cut + 1]
            rest = chunk[cut + 1 :]
            parts = [rest] if rest else []
            parts_size = len(rest)
            line_start += len(block)
            if not (yield from self._emit_or_replay(block, block_start)):
                return
            verdict = self._judge_lines(block)
            if verdict is not None:
                metrics.ARCHIVES_ABANDONED.inc()
                yield from self._damaged(verdict, line_start, b"", line_start)
                return

        pending = b"".join(parts)
        verdict = self._judge_lines(b"", final=True) if self.verdict is None else None
        if verdict is not None:
            if pending and not (yield from self._emit_or_replay(pending, line_start)):
                return
            metrics.ARCHIVES_ABANDONED.inc()
            yield from self._damaged(
                verdict, line_start + len(pending), b"", line_start
            )
            return
        damage = self._damage()
        if damage is not None:
            yield from self._damaged(
                damage, line_start + len(pending), pending, line_start
            )
            return
        if pending and not (yield from self._emit_or_replay(pending, line_start)):
            return
        yield from self._finish(line_start + len(pending))

    def _emit_or_replay(self, block: bytes, block_start: int) -> Iterator:
        """Emits a block, or below ``replay_until`` only its replayed lines.

        A resumed run's replayed lines are those the interrupted run parsed
        but whose output never reached disk; the rest of that stretch is
        decompressed, as a single frame must be, but neither parsed nor
        emitted again. Returns whether reading goes on.
        """
        until = self.element.replay_until
        if block_start >= until:
            return (yield from self._emit(block, block_start))
        end = block_start + len(block)
        offsets = _replay_offsets(self.config.replay_path, self.element.archive_id)
        index = bisect.bisect_left(offsets, block_start)
        while index < len(offsets) and offsets[index] < min(end, until):
            offset = offsets[index]
            relative = offset - block_start
            newline = block.find(b"\n", relative)
            line = block[relative : newline + 1] if newline >= 0 else block[relative:]
            if not self.tracker.try_claim(offset):
                return False
            yield LineBlock(self.element.archive_id, offset, line)
            index += 1
        if end > until:
            return (yield from self._emit(block[until - block_start :], until))
        return True

    def _finish(self, end_offset: int) -> Iterator:
        """Ends the archive: an empty block marks where it ended.

        The marker lets a resumed run tell a finished archive from one that
        was cut off, without reading it again.
        """
        # Only the restriction that reaches the archive's end owns it; a
        # primary cut off by a split may read to the end as well.
        if self.tracker.try_claim(END_OF_ARCHIVE):
            yield LineBlock(self.element.archive_id, end_offset, b"")

    def _judge_lines(self, block: bytes, final: bool = False) -> str | None:
        """Says why to stop if too many recent lines are not JSON objects.

        Counted without parsing: a line of a dump starts with ``{``. The
        share is judged over windows of ``_JUDGE_LINES`` lines. The lines
        that start in a block's first ``_JUDGE_SAMPLE_BYTES`` stand for the
        block: counting ``\n{`` over all of it would cost a quarter of the
        time of parsing it.
        """
        end = len(block)
        if end > _JUDGE_SAMPLE_BYTES:
            # A block ends with a newline, so one is found.
            end = block.find(b"\n", _JUDGE_SAMPLE_BYTES - 1) + 1
        lines = block.count(b"\n", 0, end)
        objects = block.count(b"\n{", 0, end) + (block[:1] == b"{")
        self._window_lines += lines
        self._window_bad += lines - objects
        # At the end of an archive a shorter window is judged too, so that a
        # small file that is no dump at all does not pass for one.
        if self._window_lines < (_JUDGE_FINAL_LINES if final else _JUDGE_LINES):
            return None
        share = self._window_bad / self._window_lines
        lines_judged = self._window_lines
        self._window_lines = self._window_bad = 0
        if share <= self.config.max_bad_line_share:
            return None
        self.verdict = (
            f"probably not a Pushshift dump: {share:.0%} of {lines_judged} lines"
            f" do not start a JSON object (more than --max_bad_line_share"
            f" {self.config.max_bad_line_share:.0%})"
            + ("" if final else "; stopped reading")
        )
        return self.verdict

    def _emit(self, block: bytes, block_start: int) -> Iterator:
        """Claims and emits a block; returns whether reading goes on."""
        while True:
            last_line = block_start + block.rfind(b"\n", 0, len(block) - 1) + 1
            # The compressed position lets progress follow the compressed
            # bytes where the decompressed size is unknown.
            if self.tracker.try_claim((block_start, last_line, self._last_compressed)):
                yield LineBlock(self.element.archive_id, block_start, block)
                return True
            # The restriction was split inside this block: keep the lines
            # that start before the new stop, emit them, then end.
            stop = self.tracker.current_restriction().stop
            if block_start >= stop:
                return False
            end = block.find(b"\n", stop - block_start - 1)
            if end < 0 or end + 1 >= len(block):
                raise RuntimeError(
                    f"{self.element.name}: block at {block_start} cannot be cut"
                    f" at the split point {stop}"
                )
            block = block[: end + 1]

    def _skip_to_line(self, position: int, start: int):
        """Reads past what precedes ``start`` and the line straddling it.

        Returns (bytes of the first owned line read so far, its offset), or
        None when the archive ends or is damaged before that line.
        """
        target = start - 1
        chunk = b""
        while position + len(chunk) <= target:
            position += len(chunk)
            chunk = self._next_chunk()
            if not chunk:
                yield from self._end_early(position)
                return None

        # A line starts at ``start`` if the byte before it is a newline, else
        # after the next newline: the straddling line belongs to the
        # restriction before this one.
        relative = target - position
        newline = relative if chunk[relative] == 0x0A else chunk.find(b"\n", relative)
        while newline < 0:
            position += len(chunk)
            chunk = self._next_chunk()
            if not chunk:
                yield from self._end_early(position)
                return None
            newline = chunk.find(b"\n")
        return chunk[newline + 1 :], position + newline + 1

    def _end_early(self, position: int) -> Iterator:
        damage = self._damage()
        if damage is not None:
            yield from self._damaged(damage, position, b"", position)
        else:
            yield from self._finish(position)

    def _oversized(self, pending: bytes, line_start: int):
        """Dead-letters a line longer than the limit without holding it.

        Holds the line's first bytes and one decoder read at a time, however
        long the line runs. Returns (what follows the line, its offset), or
        None when the restriction ends before the line.
        """
        split = yield from self._emit_whole_lines(pending, line_start)
        if split is None:
            return None
        pending, line_start = split
        if len(pending) <= self.config.max_record_bytes:
            return pending, line_start
        preview = pending[:DEAD_LETTER_PREVIEW_BYTES]
        length = len(pending)
        rest = b""
        ended = True
        while True:
            chunk = self._next_chunk()
            if not chunk:
                break
            newline = chunk.find(b"\n")
            if newline >= 0:
                length += newline
                rest = chunk[newline + 1 :]
                ended = False
                break
            length += len(chunk)
        if not self.tracker.try_claim(line_start):
            return None
        reason = f"record of {length} bytes exceeds --max_record_bytes"
        if ended and self._damage() is not None:
            reason = (
                f"record of at least {length} bytes, cut short by archive damage,"
                f" exceeds --max_record_bytes"
            )
        metrics.DEAD_LETTERS.inc()
        metrics.OVERSIZED_RECORDS.inc()
        yield beam.pvalue.TaggedOutput(
            DEAD_LETTER_TAG,
            DeadLetter(
                self.element.name,
                line_start,
                f"{reason} ({self.config.max_record_bytes});"
                f" kept its first {len(preview)} bytes",
                preview,
                length,
            ),
        )
        # A line the archive ends inside has no newline to step over.
        after = line_start + length + (0 if ended else 1)
        # The lines that end in the rest of the chunk go on as a block of
        # their own: what is returned is an unfinished line, without newline.
        return (yield from self._emit_whole_lines(rest, after))

    def _emit_whole_lines(self, pending: bytes, pending_start: int):
        """Emits the whole lines at the start of ``pending``, if it holds any.

        What the first read after a restriction's start leaves over can hold
        many lines, not only the start of one. Returns (the unfinished line,
        its offset), or None when the restriction ends before it.
        """
        cut = pending.rfind(b"\n")
        if cut < 0:
            return pending, pending_start
        if not (yield from self._emit_or_replay(pending[: cut + 1], pending_start)):
            return None
        return pending[cut + 1 :], pending_start + cut + 1

    def _damaged(
        self, reason: str, decompressed_offset: int, pending: bytes, pending_start: int
    ):
        """Reports damage, dead-letters a cut last line and ends the pass."""
        split = yield from self._emit_whole_lines(pending, pending_start)
        if split is None:
            return
        pending, pending_start = split
        stop = self.tracker.current_restriction().stop
        last = self.index.decompressed_size
        last = END_OF_ARCHIVE if last is None else last
        if reason != self.verdict and pending_start >= stop and stop < last:
            # Every line of this restriction was read whole; the damage lies
            # in the next one, whose pass reports it.
            self.tracker.try_claim(END_OF_ARCHIVE)
            return
        if self.decode_error_offset is not None:
            compressed_offset = self.decode_error_offset
        elif self.counter.damage is not None:
            compressed_offset = self.counter.damage.compressed_offset
        else:
            compressed_offset = self.counter.position
        if pending and self.tracker.try_claim(pending_start):
            metrics.DEAD_LETTERS.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER_TAG,
                DeadLetter(
                    self.element.name,
                    pending_start,
                    "line cut short by archive damage",
                    pending[:DEAD_LETTER_PREVIEW_BYTES],
                    len(pending),
                ),
            )
        metrics.ARCHIVES_DAMAGED.inc()
        _LOGGER.warning(
            "%s is damaged at compressed byte %d, decompressed byte %d: %s",
            self.element.name,
            compressed_offset,
            decompressed_offset,
            reason,
        )
        yield beam.pvalue.TaggedOutput(
            DAMAGE_TAG,
            Damage(
                self.element.name,
                self.element.path,
                compressed_offset,
                decompressed_offset,
                reason,
            ),
        )
        yield from self._finish(decompressed_offset)
