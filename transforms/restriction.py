"""The restriction over an archive's lines, its tracker and its coder.

A restriction is a range of decompressed byte offsets ``[start, stop)``.
Each line belongs to the restriction that contains the offset of its first
byte, so a line that starts before ``stop`` is read to its end even when it
runs past ``stop``, and a reader that starts inside a line skips to the
next one. Claimed positions are line starts, or blocks of lines claimed as
the starts of their first and last line. The end of the archive belongs to
the restriction that reaches it: claiming ``END_OF_ARCHIVE`` succeeds there
and nowhere else, and always ends the restriction.

Where a split may fall depends on what the archive allows:

* A checkpoint (a split at fraction 0) may fall anywhere: its residual
  decompresses the archive again from the frame before ``start`` and skips
  what it does not own. On a single-frame archive that means decompressing
  the prefix again, but never parsing or emitting it again.
* Any other split falls on a frame boundary whose decompressed offset is
  known (from a seek table or from frame headers that declare their content
  size), or anywhere in an uncompressed file. A single frame can only be
  decoded from its start, so a split inside it would make a second worker
  decompress everything before the split point while the first is still
  reading it, and hold a second decoder window of up to 2 GiB to do so;
  such splits are refused.

Progress and sizes are in decompressed bytes, the unit of parsing work, so
that archives of different compression ratios compare fairly.
"""

from __future__ import annotations

import bisect
import dataclasses

from apache_beam.coders import coders
from apache_beam.coders.coder_impl import create_InputStream, create_OutputStream
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker

from transforms.zstd_frames import FrameIndex

__all__ = [
    "END_OF_ARCHIVE",
    "ArchiveRestriction",
    "ArchiveRestrictionCoder",
    "ArchiveTracker",
    "estimated_size",
]

# The stop of a restriction over an archive whose decompressed size is not
# known (the monthly dumps store none). Claiming it ends any restriction.
END_OF_ARCHIVE = 2**62
# The decoder takes compressed input a read at a time, so the compressed
# position a reader reports runs up to one read ahead of what it decoded.
# The ratio seen is trusted once that lead is under an eighth of it.
_LEAD_SHARE = 8


@dataclasses.dataclass(frozen=True)
class ArchiveRestriction:
    """The lines of one archive whose first byte lies in ``[start, stop)``.

    ``estimate`` is, for a restriction without a known stop, the tracker's
    estimate of the decompressed bytes from ``start`` to the archive's end
    when it split the restriction off; 0 when there is none. It informs
    ``estimated_size`` and takes no part in comparisons.
    """

    path: str
    start: int
    stop: int
    estimate: int = dataclasses.field(default=0, compare=False)

    @property
    def bounded(self) -> bool:
        return self.stop != END_OF_ARCHIVE

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= END_OF_ARCHIVE:
            raise ValueError(
                f"invalid range [{self.start}, {self.stop}) for {self.path}"
            )
        if self.estimate < 0:
            raise ValueError(f"negative size estimate {self.estimate} for {self.path}")


class ArchiveRestrictionCoder(coders.Coder):
    """Encodes a restriction as its path and three variable-length integers."""

    def encode(self, value: ArchiveRestriction) -> bytes:
        stream = create_OutputStream()
        path = value.path.encode("utf-8")
        stream.write_var_int64(len(path))
        stream.write(path)
        stream.write_var_int64(value.start)
        stream.write_var_int64(value.stop)
        stream.write_var_int64(value.estimate)
        return stream.get()

    def decode(self, encoded: bytes) -> ArchiveRestriction:
        stream = create_InputStream(encoded)
        path = stream.read(stream.read_var_int64()).decode("utf-8")
        start = stream.read_var_int64()
        stop = stream.read_var_int64()
        estimate = stream.read_var_int64()
        return ArchiveRestriction(path, start, stop, estimate)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return ArchiveRestriction


def estimated_size(index: FrameIndex, restriction: ArchiveRestriction) -> int:
    """Decompressed bytes a restriction covers, estimated where unknown.

    A bounded restriction's size is exact. Without a stop, the size is the
    tracker's estimate made when the restriction was split off, or else the
    archive's estimated decompressed size (compressed size times the ratio
    measured on its first megabytes) less ``start``; never below 1 byte, as
    an unfinished archive is never known to be empty.
    """
    if restriction.bounded:
        return restriction.stop - restriction.start
    if restriction.estimate:
        return restriction.estimate
    return max(index.estimated_decompressed_size - restriction.start, 1)


class ArchiveTracker(RestrictionTracker):
    """Tracks claimed line starts within an ``ArchiveRestriction``.

    A claim is a line start, a block ``(first, last)`` of line starts, or a
    block ``(first, last, compressed)`` that also says how many compressed
    bytes the reader had consumed when it cut the block; the last form lets
    progress over an archive of unknown size follow the compressed bytes,
    whose total is known, instead of an estimate of the decompressed total.
    """

    def __init__(
        self,
        restriction: ArchiveRestriction,
        index: FrameIndex,
        *,
        read_bytes: int = 2**20,
    ) -> None:
        """Tracks ``restriction`` of the archive that ``index`` describes.

        Args:
            restriction: the lines to claim.
            index: the archive's frames.
            read_bytes: compressed bytes the reader's decoder takes at a time.
        """
        self._restriction = restriction
        self._index = index
        self._read_bytes = read_bytes
        self._last_claimed: int | None = None
        self._exhausted = False
        self._compressed: int | None = None
        self._best_fraction = 0.0

    def current_restriction(self) -> ArchiveRestriction:
        return self._restriction

    def _next_unclaimed(self) -> int:
        if self._last_claimed is None:
            return self._restriction.start
        return self._last_claimed + 1

    def _owns_end(self) -> bool:
        """Whether the restriction reaches the end of the archive."""
        stop = self._restriction.stop
        return stop == END_OF_ARCHIVE or stop == self._index.decompressed_size

    def try_claim(self, position) -> bool:
        """Claims a line start, a block of lines, or the end of the archive.

        A block is claimed whole or not at all. A block that reaches past
        ``stop`` but starts before it fails without ending the restriction:
        the reader then claims the part that lies before ``stop``. A claim
        whose first line is at or past ``stop`` ends the restriction.
        ``END_OF_ARCHIVE`` ends it too, and succeeds only where the
        restriction reaches the archive's end, so that exactly one
        restriction reports where the archive ended.
        """
        compressed = None
        if isinstance(position, tuple):
            if len(position) == 3:
                first, last, compressed = position
            else:
                first, last = position
        else:
            first = last = position
        restriction = self._restriction
        if first == END_OF_ARCHIVE:
            self._exhausted = True
            return self._owns_end()
        if first > last:
            raise ValueError(
                f"block claim ({first}, {last}) runs backwards in {restriction.path}"
            )
        if self._last_claimed is not None and first <= self._last_claimed:
            raise ValueError(
                f"claims must increase: {first} after {self._last_claimed}"
                f" in {restriction.path}"
            )
        if first < restriction.start:
            raise ValueError(
                f"claim {first} precedes the restriction start"
                f" {restriction.start} in {restriction.path}"
            )
        if self._exhausted:
            return False
        if last < restriction.stop:
            self._last_claimed = last
            if compressed is not None:
                self._compressed = compressed
            return True
        if first >= restriction.stop:
            self._exhausted = True
        return False

    def _finished(self) -> bool:
        restriction = self._restriction
        return self._exhausted or restriction.start >= restriction.stop

    def try_split(self, fraction_of_remainder: float):
        """Splits off what follows the next unclaimed line, or a later part.

        At fraction 0 the split falls at the next unclaimed position (a
        checkpoint). Otherwise it falls on the known frame boundary, or in
        an uncompressed file the byte, nearest to ``fraction_of_remainder``
        of what remains; None where there is none ahead of the position.
        """
        if self._finished():
            return None
        restriction = self._restriction
        current = self._next_unclaimed()

        if fraction_of_remainder <= 0:
            split_at = current
        else:
            split_at = self._split_point_after(current, fraction_of_remainder)
            if split_at is None:
                return None
        if split_at >= restriction.stop:
            return None

        estimate = 0
        if not restriction.bounded:
            estimate = max(self._remaining(split_at - restriction.start), 1)
        primary = ArchiveRestriction(restriction.path, restriction.start, split_at)
        residual = ArchiveRestriction(
            restriction.path, split_at, restriction.stop, estimate
        )
        self._restriction = primary
        return primary, residual

    def _split_point_after(self, current: int, fraction: float) -> int | None:
        """The allowed split point nearest ``fraction`` of what remains."""
        restriction = self._restriction
        if not restriction.bounded:
            return None
        target = current + fraction * (restriction.stop - current)
        if self._index.source == "plain":
            # Any byte of an uncompressed file can be read from directly.
            split_at = max(int(round(target)), current + 1)
            return split_at if split_at < restriction.stop else None
        if not self._index.splittable:
            return None
        offsets = self._index.decompressed_offsets
        position = bisect.bisect_left(offsets, target)
        candidates = [
            offsets[i]
            for i in (position - 1, position)
            if 0 <= i < len(offsets) and current < offsets[i] < restriction.stop
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda offset: abs(offset - target))

    def check_done(self) -> None:
        if self._finished():
            return
        raise ValueError(
            f"{self._restriction.path}: lines in [{self._next_unclaimed()},"
            f" {self._restriction.stop}) were not claimed"
        )

    def _remaining(self, done: int) -> int:
        """Decompressed bytes left after ``done`` of them, estimated if needed.

        Exact for a bounded restriction. Without a stop: the compressed
        bytes left, times the ratio this reader has seen since the frame it
        started decoding from; until it has seen enough for that ratio to
        mean something, the archive's estimated size less what is done.
        """
        restriction = self._restriction
        if restriction.bounded:
            return restriction.stop - restriction.start - done
        index = self._index
        position = restriction.start + done
        if self._compressed is not None and index.compressed_size > 0:
            frame = index.frame_containing(max(restriction.start - 1, 0))
            compressed_origin = index.compressed_offsets[frame]
            decoded = position - index.decompressed_offsets[frame]
            consumed = self._compressed - compressed_origin
            if consumed >= _LEAD_SHARE * self._read_bytes and decoded > 0:
                left = max(index.compressed_size - self._compressed, 0)
                return int(left * decoded / consumed)
        if restriction.estimate:
            return restriction.estimate - done
        return index.estimated_decompressed_size - position

    def current_progress(self) -> RestrictionProgress:
        """Work done and left, in decompressed bytes.

        The fraction done never falls, even where a better estimate of an
        unknown size turns out larger, and is 1.0 once the restriction is
        done; until then at least one byte is left.
        """
        restriction = self._restriction
        done = self._next_unclaimed() - restriction.start
        if self._finished():
            completed = max(done, estimated_size(self._index, restriction), 0)
            return RestrictionProgress(completed=completed, remaining=0)
        remaining = self._remaining(done)
        if not restriction.bounded:
            remaining = max(remaining, 1)
            if done > 0:
                best = self._best_fraction
                if done / (done + remaining) < best:
                    remaining = max(int(done * (1 - best) / best), 1)
                self._best_fraction = done / (done + remaining)
        return RestrictionProgress(completed=done, remaining=remaining)

    def is_bounded(self) -> bool:
        return True
