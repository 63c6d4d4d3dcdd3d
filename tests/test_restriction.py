"""The archive restriction, its tracker and coder, and the reader under splits.

The tracker tests pin claims, splits, the end of a restriction and its
progress on frame indexes built by hand. The reader tests drive the real
``ReadArchiveBlocks`` through Beam's thread-safe tracker wrapper, splitting
between its outputs as a runner's split request would, and check that the
primary and every residual together emit each line exactly once.
"""

from __future__ import annotations

import os
import random

import pytest
import zstandard
from apache_beam.runners.sdf_utils import (
    RestrictionTrackerView,
    ThreadsafeRestrictionTracker,
)

from beam_pipeline.reframe import reframe
from tests.helpers import decompress_file, real_sample
from transforms.reader import (
    ArchiveSpec,
    LineBlock,
    ReadArchiveBlocks,
    ReaderConfig,
    archive_index,
)
from transforms.restriction import (
    END_OF_ARCHIVE,
    ArchiveRestriction,
    ArchiveRestrictionCoder,
    ArchiveTracker,
    estimated_size,
)
from transforms.zstd_frames import FrameIndex, build_frame_index, encode_seek_table

PATH = "gs://bucket/RC_2023-01.zst"
# One frame of unknown size: 1,000 compressed bytes, about 5,000 decompressed.
SINGLE = FrameIndex((0,), (0,), None, 1000, 2**31, "single stream", ratio_estimate=5.0)
# One frame that declares its size.
SINGLE_SIZED = FrameIndex((0,), (0,), 4000, 800, 4000, "frame headers")
# Four frames of 1,000 decompressed bytes listed in a seek table.
SEEKABLE = FrameIndex(
    (0, 100, 200, 300), (0, 1000, 2000, 3000), 4000, 417, 1000, "seek table"
)
PLAIN = FrameIndex((0,), (0,), 500, 500, 0, "plain")


def tracker(index: FrameIndex, start: int = 0, stop: int = 0) -> ArchiveTracker:
    stop = stop or (
        index.decompressed_size
        if index.decompressed_size is not None
        else END_OF_ARCHIVE
    )
    # Decoder reads of 16 bytes: a ratio over 128 compressed bytes counts.
    return ArchiveTracker(ArchiveRestriction(PATH, start, stop), index, read_bytes=16)


def fraction(progress) -> float:
    return progress.fraction_completed


# Claims.


def test_claims_lines_and_blocks_in_order():
    t = tracker(SEEKABLE)
    assert t.try_claim(0)
    assert t.try_claim((10, 900))
    assert t.try_claim((950, 3999))
    assert t.current_progress().completed_work == 4000


def test_claims_must_increase_and_name_the_archive():
    t = tracker(SEEKABLE)
    assert t.try_claim((10, 20))
    with pytest.raises(
        ValueError,
        match=r"claims must increase: 20 after 20 in gs://bucket/RC_2023-01.zst",
    ):
        t.try_claim(20)
    with pytest.raises(ValueError, match=r"block claim \(40, 30\) runs backwards"):
        t.try_claim((40, 30))


def test_claim_before_the_start_is_an_error():
    t = tracker(SEEKABLE, 1000, 2000)
    with pytest.raises(
        ValueError, match="claim 999 precedes the restriction start 1000"
    ):
        t.try_claim(999)


def test_a_block_reaching_past_the_stop_fails_without_ending_the_restriction():
    t = tracker(SEEKABLE, 0, 2000)
    assert t.try_claim((0, 100))
    assert not t.try_claim((150, 2000))
    # The restriction goes on: its lines before 2000 are still to be claimed.
    with pytest.raises(ValueError, match=r"lines in \[101, 2000\) were not claimed"):
        t.check_done()
    assert t.try_split(0) == (
        ArchiveRestriction(PATH, 0, 101),
        ArchiveRestriction(PATH, 101, 2000),
    )


def test_claims_after_a_failed_block_claim_take_the_lines_before_the_stop():
    t = tracker(SEEKABLE, 0, 2000)
    assert not t.try_claim((150, 2500))
    assert t.try_claim((150, 1990))
    assert not t.try_claim(2010)
    t.check_done()
    assert not t.try_claim(2050)


def test_a_claim_at_the_stop_ends_the_restriction():
    t = tracker(SEEKABLE, 0, 2000)
    assert t.try_claim(1999)
    assert not t.try_claim(2000)
    t.check_done()
    assert t.try_split(0) is None


def test_only_the_restriction_that_reaches_the_end_owns_it():
    whole = tracker(SINGLE)
    assert whole.try_claim((0, 100))
    assert whole.try_claim(END_OF_ARCHIVE)
    whole.check_done()

    last = tracker(SEEKABLE, 3000, 4000)
    assert last.try_claim(END_OF_ARCHIVE)

    primary = tracker(SINGLE)
    assert primary.try_claim((0, 100))
    assert primary.try_split(0) is not None
    assert not primary.try_claim(END_OF_ARCHIVE)
    primary.check_done()

    middle = tracker(SEEKABLE, 1000, 2000)
    assert not middle.try_claim(END_OF_ARCHIVE)
    middle.check_done()


def test_check_done_names_what_was_not_claimed():
    t = tracker(SINGLE, 100)
    with pytest.raises(ValueError) as raised:
        t.check_done()
    assert str(raised.value) == (
        f"{PATH}: lines in [100, {END_OF_ARCHIVE}) were not claimed"
    )


def test_an_empty_archive_is_done_at_once():
    t = ArchiveTracker(
        ArchiveRestriction(PATH, 0, 0),
        FrameIndex((0,), (0,), 0, 13, 0, "frame headers"),
    )
    t.check_done()
    assert t.try_split(0) is None
    assert t.try_claim(END_OF_ARCHIVE)
    assert fraction(t.current_progress()) == 1.0


def test_one_record_archive():
    t = tracker(SINGLE)
    assert t.try_claim((0, 0))
    residual = t.try_split(0)[1]
    assert residual == ArchiveRestriction(PATH, 1, END_OF_ARCHIVE)
    assert not t.try_claim(END_OF_ARCHIVE)
    t.check_done()

    rest = ArchiveTracker(residual, SINGLE)
    assert rest.try_claim(END_OF_ARCHIVE)
    rest.check_done()


# Splits.


def test_checkpoint_before_any_claim_leaves_an_empty_primary():
    t = tracker(SINGLE)
    primary, residual = t.try_split(0)
    assert primary == ArchiveRestriction(PATH, 0, 0)
    assert residual == ArchiveRestriction(PATH, 0, END_OF_ARCHIVE)
    t.check_done()
    assert not t.try_claim((0, 10))


def test_checkpoint_falls_after_the_last_claimed_line():
    t = tracker(SINGLE)
    assert t.try_claim((0, 812))
    primary, residual = t.try_split(0)
    assert (primary.start, primary.stop) == (0, 813)
    assert (residual.start, residual.stop) == (813, END_OF_ARCHIVE)
    assert not t.try_claim((900, 1000))
    t.check_done()


def test_split_at_the_last_position_is_refused():
    t = tracker(SEEKABLE)
    assert t.try_claim((0, 3999))
    assert t.try_split(0) is None
    assert t.try_split(0.5) is None


def test_split_after_a_checkpoint_is_refused():
    t = tracker(SEEKABLE)
    assert t.try_claim((0, 1500))
    assert t.try_split(0) == (
        ArchiveRestriction(PATH, 0, 1501),
        ArchiveRestriction(PATH, 1501, 4000),
    )
    assert t.try_split(0) is None
    assert t.try_split(0.5) is None


def test_single_frame_refuses_every_split_but_a_checkpoint():
    for index in (SINGLE, SINGLE_SIZED):
        t = tracker(index)
        assert t.try_claim((0, 100))
        for fraction_of_remainder in (1e-6, 0.01, 0.5, 0.99, 1.0):
            assert t.try_split(fraction_of_remainder) is None
        assert t.try_split(0)[1].start == 101


def test_multi_frame_splits_at_the_frame_boundary_nearest_the_fraction():
    t = tracker(SEEKABLE)
    assert t.try_split(0.5) == (
        ArchiveRestriction(PATH, 0, 2000),
        ArchiveRestriction(PATH, 2000, 4000),
    )
    # Of [0, 2000), a small fraction still lands on a boundary ahead.
    assert t.try_split(0.01) == (
        ArchiveRestriction(PATH, 0, 1000),
        ArchiveRestriction(PATH, 1000, 2000),
    )
    assert t.try_split(0.5) is None


def test_multi_frame_splits_only_ahead_of_the_position():
    t = tracker(SEEKABLE)
    assert t.try_claim((0, 2100))
    # 0.1 of [2101, 4000) is 2291; the boundary 2000 lies behind.
    assert t.try_split(0.1)[1] == ArchiveRestriction(PATH, 3000, 4000)
    assert t.try_split(0.99) is None
    assert t.try_claim((2200, 2999))
    assert not t.try_claim(3000)
    t.check_done()


def test_plain_files_split_at_any_byte():
    t = tracker(PLAIN)
    assert t.try_claim((0, 99))
    assert t.try_split(0.5) == (
        ArchiveRestriction(PATH, 0, 300),
        ArchiveRestriction(PATH, 300, 500),
    )
    assert t.try_split(0.99) == (
        ArchiveRestriction(PATH, 0, 298),
        ArchiveRestriction(PATH, 298, 300),
    )


def test_a_residual_of_unknown_size_carries_the_trackers_estimate():
    t = tracker(SINGLE)
    assert t.try_claim((0, 1999, 400))
    residual = t.try_split(0)[1]
    # 600 compressed bytes are left, at the 2000 / 400 bytes seen so far.
    assert residual.estimate == 3000
    assert estimated_size(SINGLE, residual) == 3000
    assert residual == ArchiveRestriction(PATH, 2000, END_OF_ARCHIVE)


# Progress and sizes.


def test_bounded_progress_is_exact():
    t = tracker(SEEKABLE, 1000, 3000)
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (0, 2000)
    assert t.try_claim((1000, 1499))
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (500, 1500)
    t.try_split(0.5)
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (500, 500)
    assert not t.try_claim(2000)
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (1000, 0)


def test_unknown_size_progress_follows_the_compressed_bytes():
    t = tracker(SINGLE)
    # Before the reader says where it is: the estimated size, 5,000 bytes.
    assert t.try_claim((0, 999))
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (1000, 4000)
    # 1,500 bytes from 250 compressed: 750 compressed left at 6 to 1.
    assert t.try_claim((1000, 1499, 250))
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (1500, 4500)


def test_progress_never_falls_and_ends_at_one():
    t = tracker(SINGLE)
    seen = [fraction(t.current_progress())]
    rng = random.Random(7)
    position = compressed = 0
    while compressed < 1000:
        # Ratios that swing between 2 and 12 make the estimate of what is
        # left jump both ways.
        size = rng.randrange(100, 1200)
        compressed = min(compressed + rng.randrange(10, 60), 1000)
        assert t.try_claim((position, position + size - 1, compressed))
        position += size
        seen.append(fraction(t.current_progress()))
        assert t.current_progress().remaining_work >= 1
    assert t.try_claim(END_OF_ARCHIVE)
    seen.append(fraction(t.current_progress()))
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    assert seen[-2] < 1.0


def test_progress_past_a_low_estimate_keeps_a_byte_left():
    t = tracker(SINGLE)
    assert t.try_claim((0, 7999))
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (8000, 1)
    assert t.try_claim(END_OF_ARCHIVE)
    progress = t.current_progress()
    assert (progress.completed_work, progress.remaining_work) == (8000, 0)


def test_sizes_are_decompressed_bytes_whatever_the_compression(real_data, tmp_path):
    source = real_sample("RC_2005-12.zst")
    seekable = str(tmp_path / "RC_2005-12.seekable.zst")
    reframe(source, seekable, frame_bytes=64 * 1024, level=19)
    decompressed = len(decompress_file(source))
    reader = ReadArchiveBlocks(ReaderConfig(), {})

    sizes = []
    for path in (source, seekable):
        spec = ArchiveSpec(0, path, os.path.getsize(path))
        sizes.append(reader.restriction_size(spec, reader.initial_restriction(spec)))
    assert os.path.getsize(seekable) != os.path.getsize(source)
    # The single frame's size is estimated from its first megabytes, which
    # here are the whole archive; the seekable one's is known.
    assert sizes == [decompressed, decompressed] == [678432, 678432]


def test_coder_round_trips_and_is_deterministic():
    coder = ArchiveRestrictionCoder()
    for restriction in (
        ArchiveRestriction("RC_2005-12.zst", 0, END_OF_ARCHIVE),
        ArchiveRestriction("gs://b/dumps/Ünïcode 日本.zst", 2**40, 2**41),
        ArchiveRestriction("a.zst", 5, END_OF_ARCHIVE, estimate=123456789),
        ArchiveRestriction("", 0, 0),
    ):
        decoded = coder.decode(coder.encode(restriction))
        assert decoded == restriction
        assert decoded.estimate == restriction.estimate
    assert coder.encode(ArchiveRestriction("a", 1, 300)) == b"\x01a\x01\xac\x02\x00"
    assert coder.is_deterministic()


def test_invalid_restrictions_name_the_archive():
    with pytest.raises(ValueError, match=r"invalid range \[5, 4\) for x.zst"):
        ArchiveRestriction("x.zst", 5, 4)


# The reader under splits, driven as the SDK harness drives it.


def _expected_lines(path: str) -> list[tuple[int, bytes]]:
    data = decompress_file(path)
    lines, offset = [], 0
    for line in data.split(b"\n")[: -1 if data.endswith(b"\n") else None]:
        lines.append((offset, line))
        offset += len(line) + 1
    return lines


def _block_lines(block: LineBlock) -> list[tuple[int, bytes]]:
    if not block.data:
        return []
    lines, offset = [], block.offset
    data = block.data
    for line in data.split(b"\n")[: -1 if data.endswith(b"\n") else None]:
        lines.append((offset, line))
        offset += len(line) + 1
    return lines


def _read_with_splits(
    path: str, config: ReaderConfig, choose
) -> tuple[list, list, int]:
    """Reads an archive, asking ``choose(restriction, blocks)`` after every
    block for a split fraction (or None), until no restriction is left.

    Returns the lines emitted, the end markers and how many splits the
    tracker accepted.
    """
    spec = ArchiveSpec(0, path, os.path.getsize(path))
    reader = ReadArchiveBlocks(config, {0: os.path.basename(path)})
    reader.setup()
    pending = list(reader.split(spec, reader.initial_restriction(spec)))
    lines, markers, accepted = [], [], 0
    while pending:
        restriction = pending.pop(0)
        threadsafe = ThreadsafeRestrictionTracker(reader.create_tracker(restriction))
        blocks = 0
        for output in reader.process(spec, RestrictionTrackerView(threadsafe)):
            if not isinstance(output, LineBlock):
                continue
            lines.extend(_block_lines(output))
            if not output.data:
                markers.append(output.offset)
            blocks += 1
            wanted = choose(restriction, blocks)
            if wanted is not None:
                split = threadsafe.try_split(wanted)
                if split is not None:
                    accepted += 1
                    pending.append(split[1])
        threadsafe.check_done()
        assert threadsafe.current_progress().fraction_completed == 1.0
    return sorted(lines), markers, accepted


@pytest.fixture(scope="module")
def odd_frames(tmp_path_factory) -> str:
    """RC_2005-12 in frames of 10,007 bytes, cut mid-line, found by headers."""
    data = decompress_file(real_sample("RC_2005-12.zst"))
    path = str(tmp_path_factory.mktemp("frames") / "RC_2005-12.odd.zst")
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
    with open(path, "wb") as handle:
        for start in range(0, len(data), 10007):
            handle.write(compressor.compress(data[start : start + 10007]))
    return path


@pytest.mark.parametrize("fraction_of_remainder", [0.0, 1e-6, 0.5, 0.999])
@pytest.mark.parametrize("archive", ["single", "seekable", "odd_frames", "plain"])
def test_every_line_once_whichever_block_the_split_follows(
    archive, fraction_of_remainder, real_data, synthetic_archives, odd_frames
):
    path = {
        "single": real_sample("RC_2005-12.zst"),
        "seekable": synthetic_archives(
            "seekable_64k.zst", frame_bytes=65536, records=600
        ),
        "odd_frames": odd_frames,
        "plain": real_sample("submissions_2024-02_sample.ndjson"),
    }[archive]
    config = ReaderConfig(block_bytes=8192, read_chunk_bytes=4096, read_ahead_blocks=0)
    expected = _expected_lines(path)
    # How many blocks an unsplit read emits, end marker included.
    seen: list[int] = []
    _read_with_splits(path, config, lambda restriction, blocks: seen.append(blocks))
    count = len(seen)

    accepted_any = 0
    for after in sorted({1, 2, count // 2, count - 2, count - 1, count}):

        def choose(restriction, blocks, after=after):
            first = restriction.start == 0
            return fraction_of_remainder if first and blocks == after else None

        lines, markers, accepted = _read_with_splits(path, config, choose)
        assert lines == expected, (after, accepted)
        assert len(markers) == 1
        accepted_any += accepted
    if fraction_of_remainder == 0.0 or archive != "single":
        assert accepted_any > 0


@pytest.mark.parametrize("seed", range(6))
def test_random_splits_of_primaries_and_residuals(
    seed, real_data, synthetic_archives, odd_frames
):
    rng = random.Random(seed)
    path = [
        real_sample("RC_2006-01.zst"),
        synthetic_archives("seekable_64k.zst", frame_bytes=65536, records=600),
        odd_frames,
    ][seed % 3]
    config = ReaderConfig(
        block_bytes=16384, read_chunk_bytes=4096, desired_split_bytes=seed * 50000
    )

    def choose(restriction, blocks):
        if rng.random() < 0.15:
            return rng.choice([0.0, 0.001, 0.5, 0.99, rng.random()])
        return None

    lines, markers, accepted = _read_with_splits(path, config, choose)
    assert lines == _expected_lines(path)
    assert len(markers) == 1
    assert accepted > 0


def test_the_estimate_of_a_dump_follows_its_compressed_bytes(real_data):
    path = real_sample("AskMen_submissions_2019-10.zst")
    spec = ArchiveSpec(0, path, os.path.getsize(path))
    decompressed = len(decompress_file(path))
    # The ratio measured on the first 4 MiB is 21% short for this archive,
    # whose later records compress better.
    sampled = archive_index(path, spec.size).estimated_decompressed_size
    assert round(sampled / decompressed, 2) == 0.79

    # Reads of 64 KiB keep the decoder's lead small beside this small file.
    reader = ReadArchiveBlocks(ReaderConfig(read_chunk_bytes=65536), {0: spec.name})
    reader.setup()
    threadsafe = ThreadsafeRestrictionTracker(
        reader.create_tracker(reader.initial_restriction(spec))
    )
    totals = []
    for output in reader.process(spec, RestrictionTrackerView(threadsafe)):
        if isinstance(output, LineBlock) and output.data:
            progress = threadsafe.current_progress()
            totals.append(progress.completed_work + progress.remaining_work)
    threadsafe.check_done()
    shares = [round(total / decompressed, 2) for total in totals]
    # First the sampled estimate, then the compressed bytes' ratio, closing in.
    assert shares[0] == 0.79
    assert shares[len(shares) // 2] == 0.92
    assert shares[3 * len(shares) // 4] == 0.99


def test_seek_table_lists_frames_the_reader_starts_from(tmp_path):
    lines = [b'{"id": %d}\n' % number for number in range(10)]
    path = str(tmp_path / "two.zst")
    compressor = zstandard.ZstdCompressor(write_content_size=True)
    frames = [
        compressor.compress(b"".join(lines[:4])),
        compressor.compress(b"".join(lines[4:])),
    ]
    with open(path, "wb") as handle:
        handle.write(b"".join(frames))
        handle.write(
            encode_seek_table(
                [(len(frames[0]), 40), (len(frames[1]), len(b"".join(lines[4:])))]
            )
        )
    index = archive_index(path, os.path.getsize(path))
    assert index.source == "seek table"
    assert index.decompressed_offsets == (0, 40)
    config = ReaderConfig(block_bytes=1024, desired_split_bytes=1)
    lines_read, markers, _ = _read_with_splits(
        path, config, lambda restriction, blocks: None
    )
    assert [line for _, line in lines_read] == [line[:-1] for line in lines]
    assert markers == [sum(len(line) for line in lines)]


class _CountingFile:
    """A file that counts the bytes read from it."""

    def __init__(self, path: str) -> None:
        self._handle = open(path, "rb")
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.read_bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def close(self) -> None:
        self._handle.close()


def test_frame_boundaries_are_found_without_decompressing(
    synthetic_archives, odd_frames
):
    seekable = synthetic_archives("seekable_64k.zst", frame_bytes=65536, records=600)
    for path, source, frames in (
        (seekable, "seek table", 12),
        (odd_frames, "frame headers", 68),
    ):
        handle = _CountingFile(path)
        try:
            index = build_frame_index(handle, os.path.getsize(path))
        finally:
            handle.close()
        assert (index.source, len(index.compressed_offsets)) == (source, frames)
        # Headers, block headers and the table: a few bytes a frame.
        assert handle.read_bytes < 40 * frames, (path, handle.read_bytes)
