"""The restriction over an archive's lines, its tracker and its coder.

A restriction is a range of decompressed byte offsets ``[start, stop)``.
Each line belongs to the restriction that contains the offset of its first
byte, so a line that starts before ``stop`` is read to its end even when it
runs past ``stop``, and a reader that starts inside a line skips to the
next one. Claimed positions are line starts.

Where a split may fall depends on what the archive allows:

* A checkpoint (a split at fraction 0) may fall anywhere: its residual
  decompresses the archive again from the frame before ``start`` and skips
  what it does not own. On a single-frame archive that means decompressing
  the prefix again, but never parsing or emitting it again.
* Any other split falls on a frame boundary whose decompressed offset is
  known (from a seek table or from frame headers that declare their content
  size). A single frame can only be decoded from its start, so a split
  inside it would make two workers decompress the same prefix; such splits
  are refused.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Optional

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


@dataclasses.dataclass(frozen=True)
class ArchiveRestriction:
    """The lines of one archive whose first byte lies in ``[start, stop)``."""

    path: str
    start: int
    stop: int

    @property
    def bounded(self) -> bool:
        return self.stop != END_OF_ARCHIVE

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= END_OF_ARCHIVE:
            raise ValueError(f"invalid range [{self.start}, {self.stop}) for {self.path}")


class ArchiveRestrictionCoder(coders.Coder):
    """Encodes a restriction as its path and two variable-length integers."""

    def encode(self, value: ArchiveRestriction) -> bytes:
        stream = create_OutputStream()
        stream.write_var_int64(len(value.path.encode("utf-8")))
        stream.write(value.path.encode("utf-8"))
        stream.write_var_int64(value.start)
        stream.write_var_int64(value.stop)
        return stream.get()

    def decode(self, encoded: bytes) -> ArchiveRestriction:
        stream = create_InputStream(encoded)
        path = stream.read(stream.read_var_int64()).decode("utf-8")
        start = stream.read_var_int64()
        stop = stream.read_var_int64()
        return ArchiveRestriction(path, start, stop)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return ArchiveRestriction


def estimated_size(index: FrameIndex, restriction: ArchiveRestriction) -> int:
    """Decompressed bytes a restriction covers, estimated where unknown.

    Sizes are in decompressed bytes, the unit of parsing work, so that
    archives of different compression ratios compare fairly.
    """
    if restriction.bounded:
        return restriction.stop - restriction.start
    total = index.estimated_decompressed_size
    return max(total - restriction.start, 1)


class ArchiveTracker(RestrictionTracker):
    """Tracks claimed line starts within an ``ArchiveRestriction``."""

    def __init__(self, restriction: ArchiveRestriction, index: FrameIndex) -> None:
        self._restriction = restriction
        self._index = index
        self._last_claimed: Optional[int] = None
        self._exhausted = False

    def current_restriction(self) -> ArchiveRestriction:
        return self._restriction

    def _next_unclaimed(self) -> int:
        if self._last_claimed is None:
            return self._restriction.start
        return self._last_claimed + 1

    def try_claim(self, position) -> bool:
        """Claims a line start, or a block of lines as (first, last) starts.

        A block is claimed whole or not at all. A block that reaches past
        ``stop`` but starts before it fails without ending the restriction:
        the reader then claims the part that lies before ``stop``. A claim
        whose first line is at or past ``stop`` ends the restriction.
        """
        first, last = position if isinstance(position, tuple) else (position, position)
        if first > last:
            raise ValueError(f"block claim ({first}, {last}) runs backwards")
        if self._last_claimed is not None and first <= self._last_claimed:
            raise ValueError(
                f"claims must increase: {first} after {self._last_claimed}"
                f" in {self._restriction.path}"
            )
        if first < self._restriction.start:
            raise ValueError(
                f"claim {first} precedes the restriction start"
                f" {self._restriction.start} in {self._restriction.path}"
            )
        if last < self._restriction.stop:
            self._last_claimed = last
            return True
        if first >= self._restriction.stop:
            self._exhausted = True
        return False

    def _finished(self) -> bool:
        restriction = self._restriction
        return self._exhausted or restriction.start >= restriction.stop

    def try_split(self, fraction_of_remainder: float):
        if self._finished():
            return None
        restriction = self._restriction
        current = self._next_unclaimed()

        if fraction_of_remainder <= 0:
            split_at = current
        else:
            split_at = self._frame_boundary_after(current, fraction_of_remainder)
            if split_at is None:
                return None
        if split_at >= restriction.stop:
            return None

        primary = ArchiveRestriction(restriction.path, restriction.start, split_at)
        residual = ArchiveRestriction(restriction.path, split_at, restriction.stop)
        self._restriction = primary
        return primary, residual

    def _frame_boundary_after(self, current: int, fraction: float) -> Optional[int]:
        """The known frame boundary nearest ``fraction`` of what remains."""
        restriction = self._restriction
        if not restriction.bounded or not self._index.splittable:
            return None
        target = current + fraction * (restriction.stop - current)
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

    def current_progress(self) -> RestrictionProgress:
        restriction = self._restriction
        if self._finished():
            return RestrictionProgress(completed=estimated_size(self._index, restriction), remaining=0)
        done = self._next_unclaimed() - restriction.start
        if restriction.bounded:
            remaining = restriction.stop - restriction.start - done
        else:
            # Without a stored size the remainder is an estimate from the
            # compression ratio; it never reaches zero before the end.
            remaining = max(estimated_size(self._index, restriction) - done, 1)
        return RestrictionProgress(completed=done, remaining=remaining)

    def is_bounded(self) -> bool:
        return True
