"""A record's position: its archive's number and its decompressed offset."""

from __future__ import annotations

__all__ = ["OFFSET_BITS", "archive_of", "global_position", "offset_of"]

# The archive number sits above the offset; 48 bits of offset cover 256 TiB
# of decompressed bytes per archive.
OFFSET_BITS = 48
_OFFSET_MASK = (1 << OFFSET_BITS) - 1


def global_position(archive_id: int, offset: int) -> int:
    return (archive_id << OFFSET_BITS) | offset


def archive_of(position: int) -> int:
    return position >> OFFSET_BITS


def offset_of(position: int) -> int:
    return position & _OFFSET_MASK
