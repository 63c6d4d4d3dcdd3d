"""The splittable DoFn that streams an archive's lines in blocks.

It decompresses with python-zstandard in bounded reads, cuts the output at
line ends and emits blocks of whole lines with the decompressed offset of
their first byte. Parsing happens downstream, after a fan-out, so one core
decompressing can feed several cores parsing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import BinaryIO, Iterator, NamedTuple, Optional

import apache_beam as beam
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration

from transforms import metrics, progress
from transforms.memory import MemoryGuard
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
# Lines over which the share of lines that are not JSON objects is judged.
_JUDGE_LINES = 1000


class ArchiveSpec(NamedTuple):
    """One input archive, as matched when the pipeline was built."""

    archive_id: int
    path: str
    size: int

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
    max_bad_line_share: float = 0.5
    memory_ledger_key: str = "default"
    progress_dir: str = ""
    progress_interval_secs: float = 10.0


def _is_plain(path: str) -> bool:
    return not path.lower().endswith(".zst")


def _open_raw(path: str) -> BinaryIO:
    return FileSystems.open(path, "application/octet-stream", CompressionTypes.UNCOMPRESSED)


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
        with decompressor.stream_reader(counter, read_size=65536, closefd=False) as stream:
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
    """A file wrapper that counts compressed bytes and walks frame headers."""

    def __init__(self, handle: BinaryIO, walker: Optional[FrameWalker], start: int = 0) -> None:
        self._handle = handle
        self.walker = walker
        self.position = start
        self.damage: Optional[ArchiveDamage] = None

    def read(self, size: int = -1) -> bytes:
        if self.damage is not None:
            return b""
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
        self.position += len(data)
        return data

    def readable(self) -> bool:
        return True


class _ArchiveRestrictions(RestrictionProvider):
    """Restrictions over an archive's decompressed offsets."""

    def __init__(self, config: ReaderConfig) -> None:
        self._config = config

    def initial_restriction(self, element: ArchiveSpec) -> ArchiveRestriction:
        index = archive_index(element.path, element.size)
        stop = index.decompressed_size if index.decompressed_size is not None else END_OF_ARCHIVE
        return ArchiveRestriction(element.path, 0, stop)

    def create_tracker(self, restriction: ArchiveRestriction) -> ArchiveTracker:
        index = archive_index(restriction.path, _size_of(restriction.path))
        return ArchiveTracker(restriction, index)

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

    def restriction_size(self, element: ArchiveSpec, restriction: ArchiveRestriction) -> int:
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


@functools.lru_cache(maxsize=256)
def _size_of(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


class ReadArchiveBlocks(beam.DoFn):
    """Emits ``LineBlock``s of an archive's lines, one restriction at a time.

    Outputs tagged ``dead_letter`` carry lines too long to hold; outputs
    tagged ``damage`` say where an archive stopped being readable.
    """

    def __init__(self, config: ReaderConfig, archive_names: dict[int, str]) -> None:
        self._config = config
        self._names = archive_names
        self._provider = _ArchiveRestrictions(config)

    def setup(self) -> None:
        config = self._config
        self._guard = MemoryGuard.for_worker(config.max_memory_bytes, config.memory_ledger_key)
        progress.configure(config.progress_dir, config.progress_interval_secs)
        progress.start_reporter()

    def process(
        self,
        element: ArchiveSpec,
        tracker=beam.DoFn.RestrictionParam(_ArchiveRestrictions(ReaderConfig())),
    ) -> Iterator:
        restriction: ArchiveRestriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        index = archive_index(element.path, element.size)
        config = self._config
        need = self._guard.decoder_cost(
            index, config.read_chunk_bytes, config.block_bytes, config.max_record_bytes
        )
        reservation = self._guard.try_reserve(need, element.name)
        if reservation is None:
            tracker.defer_remainder(Duration(seconds=self._config.memory_retry_secs))
            return
        try:
            yield from _Pass(element, index, restriction, tracker, self._config, self._guard).run()
        finally:
            reservation.release()


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
        self.decode_error: Optional[str] = None
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
                walker = FrameWalker(compressed_start)
                self.counter = _CountingReader(handle, walker, compressed_start)
                decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
                self.stream = decompressor.stream_reader(
                    self.counter, read_size=self.config.read_chunk_bytes, read_across_frames=True
                )
            self._last_compressed = compressed_start
            yield from self._read(position, start)
        finally:
            handle.close()

    def _next_chunk(self) -> bytes:
        """The next decompressed bytes; empty at the end or at damage."""
        if self.decode_error is not None:
            return b""
        try:
            chunk = self.stream.read(self.config.block_bytes)
        except zstandard.ZstdError as exc:
            self.decode_error = f"zstd could not decode the archive: {exc}"
            return b""
        compressed = self.counter.position - self._last_compressed
        self._last_compressed = self.counter.position
        metrics.COMPRESSED_BYTES.inc(compressed)
        metrics.DECOMPRESSED_BYTES.inc(len(chunk))
        self.stats.advance(compressed, len(chunk), self.counter.position)
        self.guard.throttle()
        return chunk

    def _damage(self) -> Optional[str]:
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

        while True:
            chunk = self._next_chunk()
            if not chunk:
                break
            data = pending + chunk if pending else chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                pending = data
                if len(pending) > max_record:
                    outcome = yield from self._oversized(pending, line_start)
                    if outcome is None:
                        return
                    pending, line_start = outcome
                continue
            block_start = line_start
            pending = data[cut + 1 :]
            line_start += cut + 1
            block = data[: cut + 1]
            if not (yield from self._emit(block, block_start)):
                return
            verdict = self._judge_lines(block)
            if verdict is not None:
                metrics.ARCHIVES_ABANDONED.inc()
                yield from self._damaged(verdict, line_start, b"", line_start)
                return

        damage = self._damage()
        if damage is not None:
            yield from self._damaged(damage, line_start + len(pending), pending, line_start)
            return
        if pending and not (yield from self._emit(pending, line_start)):
            return
        self.tracker.try_claim(END_OF_ARCHIVE)

    def _judge_lines(self, block: bytes) -> Optional[str]:
        """Says why to stop if too many recent lines are not JSON objects.

        Counted without parsing: a line of a dump starts with ``{``. The
        share is judged over windows of ``_JUDGE_LINES`` lines.
        """
        lines = block.count(b"\n")
        objects = block.count(b"\n{") + (block[:1] == b"{")
        self._window_lines += lines
        self._window_bad += lines - objects
        if self._window_lines < _JUDGE_LINES:
            return None
        share = self._window_bad / self._window_lines
        lines_judged = self._window_lines
        self._window_lines = self._window_bad = 0
        if share <= self.config.max_bad_line_share:
            return None
        return (
            f"probably not a Pushshift dump: {share:.0%} of {lines_judged} lines"
            f" do not start a JSON object (more than --max_bad_line_share"
            f" {self.config.max_bad_line_share:.0%}); stopped reading"
        )

    def _emit(self, block: bytes, block_start: int) -> Iterator:
        """Claims and emits a block; returns whether reading goes on."""
        while True:
            last_line = block_start + block.rfind(b"\n", 0, len(block) - 1) + 1
            if self.tracker.try_claim((block_start, last_line)):
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
            self.tracker.try_claim(END_OF_ARCHIVE)

    def _oversized(self, pending: bytes, line_start: int):
        """Dead-letters a line longer than the limit without holding it."""
        preview = pending[:DEAD_LETTER_PREVIEW_BYTES]
        length = len(pending)
        rest = b""
        while True:
            chunk = self._next_chunk()
            if not chunk:
                break
            newline = chunk.find(b"\n")
            if newline >= 0:
                length += newline
                rest = chunk[newline + 1 :]
                break
            length += len(chunk)
        if not self.tracker.try_claim(line_start):
            return None
        metrics.DEAD_LETTERS.inc()
        metrics.OVERSIZED_RECORDS.inc()
        yield beam.pvalue.TaggedOutput(
            DEAD_LETTER_TAG,
            DeadLetter(
                self.element.name,
                line_start,
                f"record of {length} bytes exceeds --max_record_bytes"
                f" ({self.config.max_record_bytes}); kept its first"
                f" {len(preview)} bytes",
                preview,
                length,
            ),
        )
        return rest, line_start + length + 1

    def _damaged(self, reason: str, decompressed_offset: int, pending: bytes, pending_start: int):
        """Reports damage, dead-letters a cut last line and ends the pass."""
        if self.counter.damage is not None:
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
        self.tracker.try_claim(END_OF_ARCHIVE)
