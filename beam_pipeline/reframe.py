"""Rewriting an archive as a seekable multi-frame one, so the job splits it.

A monthly dump is one zstd frame, which can only be decoded from its start,
so the job reads it on one worker. This tool decompresses it once, as a
stream, and writes the same bytes again as frames of about ``--frame_bytes``
cut at line ends, followed by a seek table (see ``beam_pipeline.seekable``).
The job then splits the result at frame boundaries, and ``zstd -d`` still
reads it as before.

    python -m beam_pipeline.reframe RC_2023-01.zst seek.zst --frame_bytes 16MiB

Memory is the input's decoder window (up to 2 GiB for the dumps, reached
after that much output), one read of decompressed bytes, and up to two
frames being cut and compressed. Paths may be on any filesystem Beam knows.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import BinaryIO

# Google's auth library otherwise probes the cloud metadata address when a
# gs:// path is used, and retries for about 30 seconds off the cloud.
os.environ.setdefault("NO_GCE_CHECK", "true")

import zstandard  # noqa: E402
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402

from beam_pipeline.seekable import (  # noqa: E402
    DEFAULT_FRAME_BYTES,
    MAX_FRAME_BYTES,
    SeekableWriter,
)
from beam_pipeline.synth import parse_size  # noqa: E402
from transforms.zstd_frames import (  # noqa: E402
    MAX_WINDOW_SIZE,
    ArchiveDamage,
    FrameWalker,
    build_frame_index,
)

__all__ = ["ReframeError", "ReframeResult", "main", "reframe"]

_LOGGER = logging.getLogger(__name__)

# Decompressed bytes taken from the decoder at a time, and compressed bytes
# read from the input at a time.
READ_BYTES = 2**20
# How often a long rewrite logs how far it is.
LOG_INTERVAL_SECS = 10.0
# Frames smaller than this cost more in headers and lost matches than they
# gain in split points.
MIN_FRAME_BYTES = 2**10


class ReframeError(Exception):
    """The input could not be read whole, or the output not written."""


@dataclasses.dataclass(frozen=True)
class ReframeResult:
    """What a rewrite read and wrote."""

    frames: int
    decompressed_bytes: int
    compressed_bytes_in: int
    compressed_bytes_out: int
    seconds: float


class _WalkedReader:
    """Passes compressed bytes to the decoder through a frame walker.

    The walker notices a file that ends inside a frame, which the decoder
    may not report (python-zstandard can reach the end of a truncated
    stream without an error).
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.walker = FrameWalker()
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        if data:
            self.walker.feed(data)
            self.position += len(data)
        return data

    def readable(self) -> bool:
        return True


def _is_plain(path: str) -> bool:
    return path.lower().endswith((".ndjson", ".jsonl", ".json"))


def _size_of(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def _copy(
    source: BinaryIO, writer: SeekableWriter, input_path: str, total: int
) -> None:
    """Feeds every decompressed byte of ``source`` to ``writer``."""
    last_log = time.monotonic()
    while True:
        chunk = source.read(READ_BYTES)
        if not chunk:
            return
        writer.write(chunk)
        if time.monotonic() - last_log >= LOG_INTERVAL_SECS:
            last_log = time.monotonic()
            _LOGGER.info(
                "%s: %.0f MB decompressed into %d frames so far"
                " (%.0f MB compressed, of %.0f MB)",
                input_path,
                writer.bytes_in / 1e6,
                len(writer.frames),
                writer.bytes_out / 1e6,
                total / 1e6,
            )


def _read_into(input_path: str, writer: SeekableWriter, size: int) -> None:
    """Decompresses ``input_path`` into ``writer``; raises ReframeError."""
    with FileSystems.open(
        input_path, "application/octet-stream", CompressionTypes.UNCOMPRESSED
    ) as raw:
        if _is_plain(input_path):
            _copy(raw, writer, input_path, size)
            return
        reader = _WalkedReader(raw)
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
        try:
            with decompressor.stream_reader(
                reader, read_size=READ_BYTES, read_across_frames=True, closefd=False
            ) as stream:
                _copy(stream, writer, input_path, size)
            reader.walker.finish()
        except zstandard.ZstdError as exc:
            raise ReframeError(
                f"{input_path}: zstd could not decode the archive near compressed byte"
                f" {reader.position} (after {writer.bytes_in} decompressed bytes):"
                f" {exc}"
            ) from exc
        except ArchiveDamage as exc:
            raise ReframeError(
                f"{input_path}: damaged at compressed byte {exc.compressed_offset}"
                f" (after {writer.bytes_in} decompressed bytes): {exc}"
            ) from exc
        if reader.walker.offset == 0:
            raise ReframeError(
                f"{input_path}: the file is empty and holds no zstd frame"
            )


def _check_output(output_path: str, writer: SeekableWriter) -> None:
    """Reads back the written seek table; raises ReframeError if it is wrong."""
    size = _size_of(output_path)
    with FileSystems.open(
        output_path, "application/octet-stream", CompressionTypes.UNCOMPRESSED
    ) as handle:
        index = build_frame_index(handle, size)
    frames = writer.frames
    if not frames:
        return
    if (
        index.source != "seek table"
        or index.decompressed_size != writer.bytes_in
        or len(index.compressed_offsets) != len(frames)
    ):
        raise ReframeError(
            f"{output_path}: the written seek table does not read back: expected"
            f" {len(frames)} frames of {writer.bytes_in} bytes, found {index}"
        )


def reframe(
    input_path: str,
    output_path: str,
    frame_bytes: int = DEFAULT_FRAME_BYTES,
    level: int = 3,
    threads: int = 0,
    force: bool = False,
) -> ReframeResult:
    """Rewrites ``input_path`` as a seekable archive at ``output_path``.

    The output is written under a temporary name beside it and renamed
    when complete, so a failed or interrupted rewrite never leaves a file
    that looks finished. Raises ReframeError for an unreadable or damaged
    input and for an output that exists (unless ``force``) or is the input.
    """
    if not MIN_FRAME_BYTES <= frame_bytes <= MAX_FRAME_BYTES:
        raise ReframeError(
            f"--frame_bytes must be between {MIN_FRAME_BYTES} and"
            f" {MAX_FRAME_BYTES}, not {frame_bytes}"
        )
    if not FileSystems.exists(input_path):
        raise ReframeError(f"{input_path}: no such file")
    if "://" not in input_path and os.path.isdir(input_path):
        raise ReframeError(f"{input_path} is a folder, not an archive")
    if "://" in input_path or "://" in output_path:
        same = input_path == output_path
    else:
        same = os.path.abspath(input_path) == os.path.abspath(output_path) or (
            os.path.exists(output_path) and os.path.samefile(input_path, output_path)
        )
    if same:
        raise ReframeError(f"{output_path}: the output must not be the input")
    if FileSystems.exists(output_path) and not force:
        raise ReframeError(f"{output_path} exists; pass --force to replace it")

    started = time.monotonic()
    size = _size_of(input_path)
    temporary = f"{output_path}.partial-{os.getpid()}"
    try:
        with FileSystems.create(
            temporary, "application/octet-stream", CompressionTypes.UNCOMPRESSED
        ) as handle:
            writer = SeekableWriter(handle, frame_bytes, level=level, threads=threads)
            _read_into(input_path, writer, size)
            frame_count = writer.close()
        if FileSystems.exists(output_path):
            FileSystems.delete([output_path])
        FileSystems.rename([temporary], [output_path])
    except BaseException:
        if FileSystems.exists(temporary):
            FileSystems.delete([temporary])
        raise
    _check_output(output_path, writer)
    return ReframeResult(
        frames=frame_count,
        decompressed_bytes=writer.bytes_in,
        compressed_bytes_in=size,
        compressed_bytes_out=writer.bytes_out,
        seconds=time.monotonic() - started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the tool from command-line arguments; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipeline.reframe",
        description="Rewrite a single-frame zstd archive as a seekable multi-frame one"
        " that the job can split across workers; zstd -d still reads it.",
    )
    parser.add_argument("input", help="The archive to read (.zst, or .ndjson/.jsonl).")
    parser.add_argument("output", help="The seekable archive to write.")
    parser.add_argument(
        "--frame_bytes",
        default="16MiB",
        help="Decompressed bytes per frame, such as 16MiB: the finest the job"
        " can split the archive.",
    )
    parser.add_argument(
        "--level", type=int, default=3, help="zstd compression level of the new frames."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="Compression threads per frame; 0 compresses in this thread,"
        " -1 uses every core.",
    )
    parser.add_argument(
        "--force", action="store_true", help="Replace the output if it exists."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    try:
        frame_bytes = parse_size(args.frame_bytes)
    except ValueError as exc:
        print(f"error: --frame_bytes: {exc}", file=sys.stderr)
        return 2
    if not MIN_FRAME_BYTES <= frame_bytes <= MAX_FRAME_BYTES:
        print(
            f"error: --frame_bytes must be between {MIN_FRAME_BYTES} and"
            f" {MAX_FRAME_BYTES},"
            f" not {frame_bytes}",
            file=sys.stderr,
        )
        return 2
    try:
        result = reframe(
            args.input, args.output, frame_bytes, args.level, args.threads, args.force
        )
    except ReframeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}: {result.frames:,} frames,"
        f" {result.decompressed_bytes:,} bytes decompressed,"
        f" {result.compressed_bytes_in:,} -> {result.compressed_bytes_out:,}"
        f" bytes compressed in {result.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
