"""Writing archives as many frames with a seek table, so they split.

Frames end at line ends and each declares its content size; the file ends
with a seek table in a skippable frame (zstd's seekable format), which
plain zstd readers skip, so ``zstd -d`` still reads the file whole.
"""

from __future__ import annotations

from typing import BinaryIO

import zstandard

from transforms.zstd_frames import encode_seek_table

__all__ = ["DEFAULT_FRAME_BYTES", "SeekableWriter"]

# Decompressed bytes per frame: large enough that per-frame overhead and
# the lost cross-frame matches cost little, small enough to split finely.
DEFAULT_FRAME_BYTES = 16 * 2**20


class SeekableWriter:
    """Writes lines into frames of about ``frame_bytes``, then a seek table."""

    def __init__(self, handle: BinaryIO, frame_bytes: int = DEFAULT_FRAME_BYTES, level: int = 3, threads: int = 0) -> None:
        if frame_bytes < 1:
            raise ValueError(f"frame size must be positive, not {frame_bytes}")
        self._handle = handle
        self._frame_bytes = frame_bytes
        self._compressor = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True, threads=threads
        )
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._frames: list[tuple[int, int]] = []
        self.bytes_in = 0

    def write(self, data: bytes) -> None:
        """Adds bytes; a frame is cut at a line end once it is full."""
        self._buffer.append(data)
        self._buffered += len(data)
        self.bytes_in += len(data)
        while self._buffered >= self._frame_bytes:
            joined = b"".join(self._buffer)
            cut = joined.rfind(b"\n", 0, self._frame_bytes) + 1
            if cut == 0:
                # A line longer than a frame: the frame runs to its end.
                cut = joined.find(b"\n", self._frame_bytes) + 1
                if cut == 0:
                    self._buffer = [joined]
                    return
            self._flush_frame(joined[:cut])
            rest = joined[cut:]
            self._buffer = [rest] if rest else []
            self._buffered = len(rest)

    def _flush_frame(self, data: bytes) -> None:
        frame = self._compressor.compress(data)
        self._handle.write(frame)
        self._frames.append((len(frame), len(data)))

    def close(self) -> int:
        """Writes the last frame and the seek table; returns the frame count."""
        if self._buffered:
            self._flush_frame(b"".join(self._buffer))
            self._buffer, self._buffered = [], 0
        self._handle.write(encode_seek_table(self._frames))
        return len(self._frames)
