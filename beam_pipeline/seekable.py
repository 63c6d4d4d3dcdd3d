"""Writing archives as many frames with a seek table, so they split.

Frames end at line ends and each declares its content size; the file ends
with a seek table in a skippable frame (zstd's seekable format,
contrib/seekable_format in the zstd sources), which plain zstd readers
skip, so ``zstd -d`` still reads the file whole. A reader that knows the
table can start decoding at any frame, so the job splits such an archive
at frame boundaries without decompressing it first.
"""

from __future__ import annotations

from typing import BinaryIO

import zstandard

from transforms.zstd_frames import encode_seek_table

__all__ = ["DEFAULT_FRAME_BYTES", "MAX_FRAME_BYTES", "SeekableWriter"]

# Decompressed bytes per frame: large enough that per-frame overhead and
# the lost cross-frame matches cost little, small enough to split finely.
DEFAULT_FRAME_BYTES = 16 * 2**20
# The seek table stores each frame's sizes as 32-bit integers.
MAX_FRAME_BYTES = 2**32 - 1


class SeekableWriter:
    """Writes bytes into frames of about ``frame_bytes``, then a seek table.

    A frame is cut at the last line end before ``frame_bytes``; a line
    longer than that gets a frame of its own that runs to its end. What is
    buffered is at most one frame plus the last ``write``, or one line where
    a line is longer than a frame.
    """

    def __init__(
        self,
        handle: BinaryIO,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        level: int = 3,
        threads: int = 0,
    ) -> None:
        if not 1 <= frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(
                f"frame size must be between 1 and {MAX_FRAME_BYTES} bytes,"
                f" not {frame_bytes}"
            )
        self._handle = handle
        self._frame_bytes = frame_bytes
        self._compressor = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True, threads=threads
        )
        self._buffer: list[bytes] = []
        self._buffered = 0
        # True while the buffer holds more than a frame with no line end
        # past the frame size: the frame waits for the end of its last line.
        self._open_line = False
        self._frames: list[tuple[int, int]] = []
        self._closed = False
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def frames(self) -> list[tuple[int, int]]:
        """(compressed, decompressed) sizes of the frames written so far."""
        return list(self._frames)

    def write(self, data: bytes) -> None:
        """Adds bytes; a frame is cut at a line end once it is full."""
        if self._closed:
            raise ValueError("write to a closed SeekableWriter")
        if not data:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self.bytes_in += len(data)
        if self._buffered < self._frame_bytes:
            return
        if self._open_line and b"\n" not in data:
            # Joining again would cost a copy of the whole line per write.
            return

        joined = b"".join(self._buffer)
        view = memoryview(joined)
        start = 0
        self._open_line = False
        while len(joined) - start >= self._frame_bytes:
            limit = start + self._frame_bytes
            cut = joined.rfind(b"\n", start, limit) + 1
            if cut == 0:
                # A line longer than a frame: the frame runs to its end.
                cut = joined.find(b"\n", limit) + 1
                if cut == 0:
                    self._open_line = True
                    break
            self._flush_frame(view[start:cut])
            start = cut
        rest = joined[start:] if start else joined
        self._buffer = [rest] if rest else []
        self._buffered = len(rest)

    def _flush_frame(self, data) -> None:
        size = len(data)
        if size > MAX_FRAME_BYTES:
            raise ValueError(
                f"a line of over {MAX_FRAME_BYTES} bytes at decompressed byte"
                f" {self.bytes_in - self._buffered} does not fit one frame of the"
                " seek table"
            )
        frame = self._compressor.compress(data)
        self._handle.write(frame)
        self._frames.append((len(frame), size))
        self.bytes_out += len(frame)

    def close(self) -> int:
        """Writes the last frame and the seek table; returns the frame count.

        The handle is left open. Closing twice writes nothing more.
        """
        if self._closed:
            return len(self._frames)
        if self._buffered:
            self._flush_frame(b"".join(self._buffer))
            self._buffer, self._buffered = [], 0
        table = encode_seek_table(self._frames)
        self._handle.write(table)
        self.bytes_out += len(table)
        self._closed = True
        return len(self._frames)
