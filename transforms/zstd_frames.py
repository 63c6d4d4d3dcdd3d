"""Zstandard frame structure: headers, a streaming frame walker, seek tables.

Nothing here decompresses. The walker follows the frame and block headers
of RFC 8878 as compressed bytes flow past, which is enough to know where
frames start and end, whether the stream ended inside a frame, and how large
a window a frame asks for, without holding more than a header in memory.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO

__all__ = [
    "FRAME_MAGIC",
    "MAX_WINDOW_SIZE",
    "SEEKABLE_MAGIC",
    "ArchiveDamage",
    "FrameHeader",
    "FrameIndex",
    "FrameWalker",
    "build_frame_index",
    "describe_magic",
    "encode_seek_table",
    "parse_frame_header",
    "read_seek_table",
]

FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC_MIN = 0x184D2A50
SKIPPABLE_MAGIC_MAX = 0x184D2A5F
# The skippable frame that carries a seek table, and the magic number that
# ends the file in zstd's seekable format (contrib/seekable_format).
SEEK_TABLE_SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
SEEK_TABLE_FOOTER_SIZE = 9

# The monthly dumps are written with `zstd --long=31`, whose frames ask for
# a 2 GiB window; libzstd refuses windows above 2**27 unless told otherwise.
MAX_WINDOW_SIZE = 2**31

# The largest frame header: magic, descriptor, window byte, 4-byte
# dictionary id and 8-byte content size.
_MAX_HEADER_SIZE = 18
_BLOCK_HEADER_SIZE = 3


class ArchiveDamage(Exception):
    """An archive's compressed bytes do not form valid zstd frames."""

    def __init__(self, message: str, compressed_offset: int) -> None:
        super().__init__(message)
        self.compressed_offset = compressed_offset


# Leading bytes of formats that a mislabelled or wrongly downloaded ``.zst``
# file holds instead, so that a damage report can say what the file is.
_FOREIGN_FORMATS = (
    (b"\x1f\x8b", "a gzip file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"BZh", "a bzip2 file"),
    (b"PK\x03\x04", "a zip file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip file"),
    (b"\x04\x22\x4d\x18", "an lz4 file"),
)
# zstd before version 1.0 wrote frames with magic numbers 0xFD2FB522-27.
_LEGACY_MAGICS = range(0xFD2FB522, 0xFD2FB528)


def describe_magic(head: bytes) -> str:
    """What the bytes found where a zstd frame should start look like."""
    for prefix, name in _FOREIGN_FORMATS:
        shared = min(len(prefix), len(head))
        if shared >= 2 and head[:shared] == prefix[:shared]:
            return name
    if len(head) == 4 and struct.unpack("<I", head)[0] in _LEGACY_MAGICS:
        return "a frame of zstd's pre-1.0 format, which is not supported"
    if not head.strip(b"\x00"):
        return "zero bytes"
    if head.lstrip()[:1] in (b"{", b"["):
        return "uncompressed JSON text"
    if all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head):
        return "plain text"
    return "not a known format"


@dataclasses.dataclass(frozen=True)
class FrameHeader:
    """What a zstd frame header declares."""

    header_size: int
    window_size: int
    content_size: int | None
    has_checksum: bool


def parse_frame_header(data: bytes, offset: int = 0) -> FrameHeader | None:
    """Parses the frame header at ``offset`` of ``data``.

    Returns None when ``data`` is too short to hold the whole header.
    Raises ArchiveDamage when the bytes are not a zstd frame header.
    """
    if len(data) - offset < 6:
        return None
    (magic,) = struct.unpack_from("<I", data, offset)
    if magic != FRAME_MAGIC:
        raise ArchiveDamage(
            f"expected a zstd frame, found magic 0x{magic:08x}"
            f" ({describe_magic(data[offset : offset + 4])})",
            0,
        )

    descriptor = data[offset + 4]
    fcs_flag = descriptor >> 6
    single_segment = bool(descriptor & 0x20)
    if descriptor & 0x08:
        raise ArchiveDamage("frame header sets the reserved bit", 0)
    has_checksum = bool(descriptor & 0x04)
    dict_id_size = (0, 1, 2, 4)[descriptor & 0x03]
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    window_byte_size = 0 if single_segment else 1
    header_size = 5 + window_byte_size + dict_id_size + fcs_size
    if len(data) - offset < header_size:
        return None

    position = offset + 5
    window_size = 0
    if not single_segment:
        window_byte = data[position]
        exponent, mantissa = window_byte >> 3, window_byte & 0x07
        window_base = 1 << (10 + exponent)
        window_size = window_base + (window_base // 8) * mantissa
        position += 1
    position += dict_id_size

    content_size: int | None = None
    if fcs_size:
        raw = int.from_bytes(data[position : position + fcs_size], "little")
        content_size = raw + 256 if fcs_size == 2 else raw
    if single_segment:
        window_size = content_size or 0
    return FrameHeader(header_size, window_size, content_size, has_checksum)


class FrameWalker:
    """Follows frame and block headers over a stream of compressed bytes.

    Feed it every compressed byte in order with ``feed``; it keeps only the
    bytes of a header that straddles two chunks. ``finish`` says whether the
    stream ended at a frame boundary.
    """

    _MAGIC = 0
    _DESCRIPTOR = 1
    _HEADER_REST = 2
    _BLOCK_HEADER = 3
    _SKIP = 4
    _CHECKSUM = 5
    _SKIPPABLE_SIZE = 6

    def __init__(
        self, start_offset: int = 0, frame_sizes: dict[int, int] | None = None
    ) -> None:
        self.offset = start_offset
        # The index's decompressed size of each frame by its compressed
        # offset; a frame header that disagrees shows the index is wrong.
        self._frame_sizes = frame_sizes
        self.frame_start: int | None = None
        self.frames_seen = 0
        self.max_window_size = 0
        self.current_header: FrameHeader | None = None
        self._state = self._MAGIC
        self._needed = 4
        self._pending = b""
        self._descriptor = 0
        self._skip = 0
        self._after_skip = self._MAGIC
        self._frame_ends_after_skip = False
        # Where the frame header, block (header and data) or checksum being
        # fed began.
        self.unit_offset = start_offset

    @property
    def inside_frame(self) -> bool:
        """Whether the bytes fed so far stop inside a frame."""
        return self._state != self._MAGIC or bool(self._pending)

    @property
    def at_block_boundary(self) -> bool:
        """Whether the bytes fed so far end a block of an unfinished frame.

        The walker then waits for the next block header or the checksum,
        of which no byte has come yet.
        """
        return self._state in (self._BLOCK_HEADER, self._CHECKSUM) and not self._pending

    @property
    def unit_remaining(self) -> int:
        """Bytes still missing from the header, block or checksum being fed."""
        if self._state == self._SKIP:
            return self._skip
        return self._needed - len(self._pending)

    def feed(self, data: bytes) -> None:
        """Consumes the next compressed bytes; raises ArchiveDamage."""
        position = 0
        size = len(data)
        while position < size:
            if self._state == self._SKIP:
                step = min(self._skip, size - position)
                self._skip -= step
                position += step
                self.offset += step
                if self._skip == 0:
                    if self._frame_ends_after_skip:
                        self._frame_ends_after_skip = False
                        self._end_frame()
                    else:
                        self._next(self._after_skip)
                        if self._after_skip == self._MAGIC:
                            self.frame_start = None  # a skippable frame ended
                continue

            take = min(self._needed - len(self._pending), size - position)
            self._pending += data[position : position + take]
            position += take
            self.offset += take
            if len(self._pending) == self._needed:
                header, self._pending = self._pending, b""
                self._on_header(header, self.offset - len(header))

    def finish(self) -> None:
        """Raises ArchiveDamage if the stream stopped inside a frame."""
        if not self.inside_frame:
            return
        # Cut inside a magic number, the frame starts where its bytes began.
        start = self.frame_start
        if start is None:
            start = self.offset - len(self._pending)
        raise ArchiveDamage(
            f"archive ends inside the frame that starts at compressed byte"
            f" {start} (truncated after {self.offset} compressed bytes)",
            self.offset,
        )

    def _header_bytes(self, state: int) -> int:
        if state == self._BLOCK_HEADER:
            return _BLOCK_HEADER_SIZE
        if state == self._DESCRIPTOR:
            return 1
        return 4  # magic, checksum, skippable frame size

    def _next(self, state: int, needed: int | None = None) -> None:
        if state in (self._MAGIC, self._BLOCK_HEADER, self._CHECKSUM):
            self.unit_offset = self.offset
        self._state = state
        self._needed = needed if needed is not None else self._header_bytes(state)

    def _on_header(self, header: bytes, header_offset: int) -> None:
        state = self._state
        if state == self._MAGIC:
            (magic,) = struct.unpack("<I", header)
            self.frame_start = header_offset
            if magic == FRAME_MAGIC:
                self._next(self._DESCRIPTOR)
            elif SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX:
                self._next(self._SKIPPABLE_SIZE)
            else:
                raise ArchiveDamage(
                    f"expected a zstd frame at compressed byte {header_offset},"
                    f" found magic 0x{magic:08x} ({describe_magic(header)})",
                    header_offset,
                )
        elif state == self._DESCRIPTOR:
            descriptor = header[0]
            self._descriptor = descriptor
            single_segment = bool(descriptor & 0x20)
            rest = (
                (0 if single_segment else 1)
                + (0, 1, 2, 4)[descriptor & 0x03]
                + (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
            )
            if rest:
                self._next(self._HEADER_REST, rest)
            else:
                self._on_frame_header(b"")
        elif state == self._HEADER_REST:
            self._on_frame_header(header)
        elif state == self._BLOCK_HEADER:
            self._on_block_header(header, header_offset)
        elif state == self._CHECKSUM:
            self._end_frame()
        else:  # _SKIPPABLE_SIZE
            (frame_size,) = struct.unpack("<I", header)
            self._start_skip(frame_size, self._MAGIC)
            if frame_size == 0:
                self.frame_start = None

    def _on_frame_header(self, rest: bytes) -> None:
        raw = struct.pack("<IB", FRAME_MAGIC, self._descriptor) + rest
        try:
            parsed = parse_frame_header(raw)
        except ArchiveDamage as exc:
            raise ArchiveDamage(
                f"{exc} (frame at compressed byte {self.frame_start})",
                self.frame_start or 0,
            ) from None
        assert parsed is not None
        if self._frame_sizes is not None:
            self._check_index(parsed)
        self.current_header = parsed
        self.max_window_size = max(self.max_window_size, parsed.window_size)
        self._next(self._BLOCK_HEADER)

    def _check_index(self, header: FrameHeader) -> None:
        """Raises ArchiveDamage if the frame is not where the index says."""
        start = self.frame_start or 0
        expected = self._frame_sizes.get(start)
        if expected is None:
            raise ArchiveDamage(
                f"a zstd frame starts at compressed byte {start}, where the"
                f" archive's seek table lists none: the table is wrong",
                start,
            )
        if header.content_size is not None and header.content_size != expected:
            raise ArchiveDamage(
                f"the zstd frame at compressed byte {start} holds"
                f" {header.content_size} bytes, its seek table entry says"
                f" {expected}: the table is wrong",
                start,
            )

    def _on_block_header(self, header: bytes, header_offset: int) -> None:
        raw = int.from_bytes(header, "little")
        block_type = (raw >> 1) & 3
        if block_type == 3:
            raise ArchiveDamage(
                f"reserved block type at compressed byte {header_offset}",
                header_offset,
            )
        body = 1 if block_type == 1 else raw >> 3
        if not raw & 1:
            self._start_skip(body, self._BLOCK_HEADER)
            return
        assert self.current_header is not None
        if self.current_header.has_checksum:
            self._start_skip(body, self._CHECKSUM)
        elif body:
            self._frame_ends_after_skip = True
            self._start_skip(body, self._MAGIC)
        else:
            self._end_frame()

    def _start_skip(self, count: int, then: int) -> None:
        if count == 0:
            self._next(then)
            return
        self._skip = count
        self._after_skip = then
        self._state = self._SKIP

    def _end_frame(self) -> None:
        self.frames_seen += 1
        self.current_header = None
        self.frame_start = None
        self._next(self._MAGIC)


@dataclasses.dataclass(frozen=True)
class FrameIndex:
    """Where an archive's frames start, in compressed and decompressed bytes.

    ``compressed_offsets[i]`` and ``decompressed_offsets[i]`` locate frame i.
    ``decompressed_size`` is None when some frame does not declare its size;
    then only the listed frames are known and the archive cannot be split
    past the last of them.
    """

    compressed_offsets: tuple[int, ...]
    decompressed_offsets: tuple[int, ...]
    decompressed_size: int | None
    compressed_size: int
    window_size: int
    source: str
    # Decompressed bytes per compressed byte, measured on the archive's first
    # megabytes where the size is not stored.
    ratio_estimate: float = 1.0

    @property
    def estimated_decompressed_size(self) -> int:
        if self.decompressed_size is not None:
            return self.decompressed_size
        return int(self.compressed_size * self.ratio_estimate)

    @property
    def splittable(self) -> bool:
        return self.decompressed_size is not None and len(self.compressed_offsets) > 1

    def frame_sizes(self) -> dict[int, int] | None:
        """Decompressed size of each listed frame by its compressed offset.

        None when the sizes are not all known.
        """
        known = self.source in ("seek table", "frame headers")
        if self.decompressed_size is None or not known:
            return None
        ends = self.decompressed_offsets[1:] + (self.decompressed_size,)
        return {
            compressed: end - start
            for compressed, start, end in zip(
                self.compressed_offsets, self.decompressed_offsets, ends, strict=True
            )
        }

    def frame_containing(self, decompressed_offset: int) -> int:
        """Index of the last frame that starts at or before the offset."""
        import bisect

        return max(
            0, bisect.bisect_right(self.decompressed_offsets, decompressed_offset) - 1
        )


def encode_seek_table(frames: list[tuple[int, int]]) -> bytes:
    """Encodes a seek table for (compressed, decompressed) frame sizes."""
    entries = b"".join(struct.pack("<II", c, d) for c, d in frames)
    footer = struct.pack("<IBI", len(frames), 0, SEEKABLE_MAGIC)
    body = entries + footer
    return struct.pack("<II", SEEK_TABLE_SKIPPABLE_MAGIC, len(body)) + body


def read_seek_table(handle: BinaryIO, file_size: int) -> list[tuple[int, int]] | None:
    """Reads the (compressed, decompressed) sizes of a seekable archive.

    Returns None when the file does not end in a seek table, or in one
    whose frames do not fill the file up to the table exactly: a damaged
    table is ignored rather than trusted with where records lie.
    """
    if file_size < SEEK_TABLE_FOOTER_SIZE + 8:
        return None
    handle.seek(file_size - SEEK_TABLE_FOOTER_SIZE)
    footer = handle.read(SEEK_TABLE_FOOTER_SIZE)
    frame_count, descriptor, magic = struct.unpack("<IBI", footer)
    if magic != SEEKABLE_MAGIC:
        return None
    entry_size = 12 if descriptor & 0x80 else 8
    table_size = frame_count * entry_size + SEEK_TABLE_FOOTER_SIZE
    table_start = file_size - table_size - 8
    if table_start < 0:
        return None
    handle.seek(table_start)
    raw = handle.read(table_size + 8)
    skippable_magic, body_size = struct.unpack_from("<II", raw)
    if skippable_magic != SEEK_TABLE_SKIPPABLE_MAGIC or body_size != table_size:
        return None
    entries = [
        struct.unpack_from("<II", raw, 8 + i * entry_size) for i in range(frame_count)
    ]
    if sum(compressed for compressed, _ in entries) != table_start:
        return None
    return entries


def build_frame_index(handle: BinaryIO, file_size: int) -> FrameIndex:
    """Locates an archive's frames without decompressing it.

    A seek table answers at once. Without one, frames are walked by their
    block headers (a seek per block) only while each frame declares its
    content size; the first frame that does not ends the walk, since the
    decompressed offsets after it cannot be known without decompressing.
    """
    handle.seek(0)
    head = handle.read(_MAX_HEADER_SIZE)
    window_size = 0
    try:
        first = parse_frame_header(head) if len(head) >= 6 else None
    except ArchiveDamage:
        first = None
    if first is not None:
        # A frame that asks for more than the decoder allows fails at its
        # first block, having cost no more memory than that.
        window_size = min(first.window_size, MAX_WINDOW_SIZE)

    table = read_seek_table(handle, file_size)
    if table:
        compressed, decompressed = [], []
        c_offset = d_offset = 0
        for c_size, d_size in table:
            compressed.append(c_offset)
            decompressed.append(d_offset)
            c_offset += c_size
            d_offset += d_size
        return FrameIndex(
            tuple(compressed),
            tuple(decompressed),
            d_offset,
            file_size,
            window_size,
            "seek table",
        )

    if first is None or first.content_size is None:
        return FrameIndex((0,), (0,), None, file_size, window_size, "single stream")

    compressed, decompressed = [], []
    c_offset = d_offset = 0
    complete = True
    while c_offset < file_size:
        handle.seek(c_offset)
        head = handle.read(_MAX_HEADER_SIZE)
        if len(head) < 8:
            complete = False
            break
        (magic,) = struct.unpack_from("<I", head)
        if SKIPPABLE_MAGIC_MIN <= magic <= SKIPPABLE_MAGIC_MAX:
            (size,) = struct.unpack_from("<I", head, 4)
            c_offset += 8 + size
            continue
        try:
            header = parse_frame_header(head)
        except ArchiveDamage:
            complete = False
            break
        if header is None or header.content_size is None:
            complete = False
            break
        window_size = max(window_size, min(header.window_size, MAX_WINDOW_SIZE))
        frame_end = _walk_blocks(handle, c_offset + header.header_size, file_size)
        if frame_end is None:
            complete = False
            break
        compressed.append(c_offset)
        decompressed.append(d_offset)
        c_offset = frame_end + (4 if header.has_checksum else 0)
        d_offset += header.content_size

    if not compressed:
        return FrameIndex((0,), (0,), None, file_size, window_size, "single stream")
    return FrameIndex(
        tuple(compressed),
        tuple(decompressed),
        d_offset if complete else None,
        file_size,
        window_size,
        "frame headers",
    )


def _walk_blocks(handle: BinaryIO, offset: int, file_size: int) -> int | None:
    """Offset just past a frame's last block, or None if the file ends first."""
    while True:
        handle.seek(offset)
        raw = handle.read(_BLOCK_HEADER_SIZE)
        if len(raw) < _BLOCK_HEADER_SIZE:
            return None
        value = int.from_bytes(raw, "little")
        block_type = (value >> 1) & 3
        body = 1 if block_type == 1 else value >> 3
        offset += _BLOCK_HEADER_SIZE + body
        if offset > file_size:
            return None
        if value & 1:
            return offset
