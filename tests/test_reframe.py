"""The reframe tool and the seekable writer it streams into."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import subprocess
import sys

import pytest
import zstandard

from beam_pipeline.reframe import ReframeError, main, reframe
from beam_pipeline.seekable import SeekableWriter
from beam_pipeline.synth import SynthSpec, generate
from tests.helpers import PROJECT_ROOT, decompress_file, real_sample
from transforms.reader import (
    ArchiveSpec,
    ReadArchiveBlocks,
    ReaderConfig,
    archive_index,
)
from transforms.zstd_frames import read_seek_table

MIB = 2**20
# sha256 of the decompressed samples, from ../shared/data/README.md.
SHA256 = {
    "RC_2005-12.zst": (
        "bcbdf633f1306da0ac99f4c9e01b41d123626101742a6a7a2eb5a1956a744175"
    ),
    "AskMen_submissions_2019-10.zst": (
        "b10d94b25f4b5a623cd76d86171ac4a1d17fdfa38dc26bb9c88d413af7bd6f87"
    ),
}


def reframe_cli(*arguments: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beam_pipeline.reframe", *arguments],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NO_GCE_CHECK="true"),
        **kwargs,
    )


def zstd_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["zstd", *arguments], capture_output=True, timeout=120)


def frames_of(path: str) -> list[tuple[int, int]]:
    with open(path, "rb") as handle:
        return read_seek_table(handle, os.path.getsize(path))


@pytest.mark.parametrize("name", sorted(SHA256))
def test_zstd_reads_a_reframed_dump_byte_for_byte(name, real_data, tmp_path):
    output = str(tmp_path / name)

    process = reframe_cli(real_sample(name), output, "--frame_bytes", "256KiB")

    assert process.returncode == 0, process.stderr
    decompressed = zstd_cli("-dc", output)
    assert decompressed.returncode == 0, decompressed.stderr
    assert hashlib.sha256(decompressed.stdout).hexdigest() == SHA256[name]
    assert zstd_cli("-t", output).returncode == 0
    frames = frames_of(output)
    size = len(decompressed.stdout)
    assert process.stdout.startswith(
        f"wrote {output}: {len(frames):,} frames, {size:,} bytes decompressed, "
    )
    # zstd -l counts the seek table as a skippable frame.
    listing = zstd_cli("-lv", output).stdout.decode()
    assert f"# Zstandard Frames: {len(frames)}\n" in listing
    assert "# Skippable Frames: 1\n" in listing


def test_frames_end_at_line_ends_and_stay_under_the_frame_size(real_data, tmp_path):
    source = real_sample("AskMen_submissions_2019-10.zst")
    output = str(tmp_path / "AskMen.zst")

    result = reframe(source, output, frame_bytes=MIB)

    data = decompress_file(source)
    frames = frames_of(output)
    assert result.frames == len(frames) == 25
    assert (
        result.decompressed_bytes
        == sum(size for _, size in frames)
        == len(data)
        == 26168344
    )
    assert result.compressed_bytes_out == os.path.getsize(output)
    offset = 0
    for _, size in frames:
        assert 0 < size <= MIB
        offset += size
        assert data[offset - 1 : offset] == b"\n"
    # Each frame stores its size, so the frame headers alone index it too.
    index = archive_index(output, os.path.getsize(output))
    assert index.source == "seek table"
    assert index.splittable
    assert index.window_size <= MIB


def test_the_job_splits_a_reframed_dump_at_its_frames(real_data, tmp_path):
    source = real_sample("AskMen_submissions_2019-10.zst")
    output = str(tmp_path / "AskMen.zst")
    reframe(source, output, frame_bytes=MIB)
    reader = ReadArchiveBlocks(ReaderConfig(desired_split_bytes=4 * MIB), {})

    single = ArchiveSpec(0, source, os.path.getsize(source))
    seekable = ArchiveSpec(1, output, os.path.getsize(output))
    whole = list(reader.split(single, reader.initial_restriction(single)))
    parts = list(reader.split(seekable, reader.initial_restriction(seekable)))

    assert len(whole) == 1
    index = archive_index(output, seekable.size)
    assert {part.start for part in parts} <= set(index.decompressed_offsets)
    assert all(left.stop == right.start for left, right in itertools.pairwise(parts))
    assert parts[0].start == 0 and parts[-1].stop == 26168344
    # 25 frames of just under 1 MiB, cut every 4 MiB or more: 5 frames a part.
    assert [
        len([o for o in index.decompressed_offsets if p.start <= o < p.stop])
        for p in parts
    ] == [5, 5, 5, 5, 5]


def test_plain_input_and_an_empty_archive(real_data, tmp_path):
    plain = real_sample("comments_2024-02_sample.ndjson")
    output = str(tmp_path / "comments.zst")
    result = reframe(plain, output, frame_bytes=4096)
    with open(plain, "rb") as handle:
        assert zstd_cli("-dc", output).stdout == handle.read()
    assert result.frames == len(frames_of(output)) == 10

    empty = str(tmp_path / "empty.zst")
    with open(empty, "wb") as handle:
        handle.write(zstandard.ZstdCompressor().compress(b""))
    output = str(tmp_path / "empty.seekable.zst")
    result = reframe(empty, output)
    assert result.frames == 0
    decompressed = zstd_cli("-dc", output)
    assert decompressed.returncode == 0 and decompressed.stdout == b""


def test_a_truncated_archive_fails_and_leaves_no_output(real_data, tmp_path, capsys):
    source = real_sample("RC_2006-01.zst")
    truncated = str(tmp_path / "RC_2006-01.zst")
    with open(source, "rb") as handle:
        data = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(data[:300000])
    output = str(tmp_path / "out.zst")

    assert main([truncated, output]) == 1

    stderr = capsys.readouterr().err
    assert stderr.startswith(
        f"error: {truncated}: damaged at compressed byte 300000 (after "
    )
    assert "archive ends inside the frame that starts at compressed byte 0" in stderr
    assert sorted(os.listdir(tmp_path)) == ["RC_2006-01.zst"]


def test_refuses_to_overwrite_unless_forced(real_data, tmp_path, capsys):
    source = real_sample("RC_2005-12.zst")
    output = str(tmp_path / "out.zst")
    with open(output, "wb") as handle:
        handle.write(b"keep me")

    assert main([source, output]) == 1
    assert (
        capsys.readouterr().err
        == f"error: {output} exists; pass --force to replace it\n"
    )
    with open(output, "rb") as handle:
        assert handle.read() == b"keep me"

    assert main([source, output, "--force", "--frame_bytes", "64KiB"]) == 0
    assert (
        hashlib.sha256(zstd_cli("-dc", output).stdout).hexdigest()
        == SHA256["RC_2005-12.zst"]
    )

    with pytest.raises(ReframeError, match="the output must not be the input"):
        reframe(output, output, force=True)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--frame_bytes", "12 parsecs"],
            "error: --frame_bytes: not a size: '12 parsecs'",
        ),
        (
            ["--frame_bytes", "100"],
            "error: --frame_bytes must be between 1024 and 4294967295, not 100",
        ),
        (
            ["--frame_bytes", "5GiB"],
            "error: --frame_bytes must be between 1024 and 4294967295, not 5368709120",
        ),
    ],
)
def test_bad_frame_sizes_are_one_line_errors(
    arguments, message, real_data, tmp_path, capsys
):
    assert (
        main([real_sample("RC_2005-12.zst"), str(tmp_path / "out.zst"), *arguments])
        == 2
    )

    assert capsys.readouterr().err == message + "\n"
    assert not os.path.exists(tmp_path / "out.zst")


def test_a_missing_input_is_named(tmp_path, capsys):
    missing = str(tmp_path / "RC_1999-01.zst")

    assert main([missing, str(tmp_path / "out.zst")]) == 1

    assert capsys.readouterr().err == f"error: {missing}: no such file\n"


def _peak_rss(source: str, output: str) -> int:
    """Peak resident memory of one reframe in a fresh process, in KiB."""
    # VmHWM, unlike getrusage's ru_maxrss, starts afresh at exec and so
    # does not inherit the test process's own peak.
    script = (
        "import sys\n"
        "from beam_pipeline.reframe import main\n"
        "code = main(sys.argv[1:])\n"
        "with open('/proc/self/status') as status:\n"
        "    peak = [line for line in status if line.startswith('VmHWM')][0]\n"
        "print(peak.split()[1])\n"
        "sys.exit(code)\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script, source, output, "--frame_bytes", "1MiB"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NO_GCE_CHECK="true"),
    )
    assert process.returncode == 0, process.stderr
    return int(process.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_the_archive(tmp_path):
    # A 1 MiB window keeps the decoder small, so what is left to grow is
    # what the tool itself holds.
    small, large = str(tmp_path / "small.zst"), str(tmp_path / "large.zst")
    generate(small, SynthSpec(target_bytes=4 * 10**6, seed=3), window_log=20)
    generate(large, SynthSpec(target_bytes=32 * 10**6, seed=3), window_log=20)

    small_rss = _peak_rss(small, str(tmp_path / "small.out.zst"))
    large_rss = _peak_rss(large, str(tmp_path / "large.out.zst"))

    # Holding the 32 MB archive and its output would add about a third to
    # the interpreter and Beam's imports.
    assert large_rss < 1.1 * small_rss, (small_rss, large_rss)


def test_writer_cuts_at_line_ends_and_gives_a_long_line_its_own_frame():
    handle = io.BytesIO()
    writer = SeekableWriter(handle, frame_bytes=10)
    for piece in (b"aaa\nbb", b"b\ncccc", b"\n", b"d" * 25, b"d\ne\n", b"f"):
        writer.write(piece)
    assert writer.close() == 4
    assert [size for _, size in writer.frames] == [8, 5, 27, 3]
    data = handle.getvalue()
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(data), read_across_frames=True
    )
    assert reader.read() == b"aaa\nbbb\ncccc\n" + b"d" * 26 + b"\ne\nf"
    handle.seek(0)
    assert read_seek_table(handle, len(data)) == writer.frames
    with pytest.raises(ValueError, match="write to a closed SeekableWriter"):
        writer.write(b"more")


def test_a_line_longer_than_many_frames_is_one_frame():
    writer = SeekableWriter(io.BytesIO(), frame_bytes=1024)
    for _ in range(1024):
        writer.write(b"x" * 4096)
    writer.write(b"\n")
    assert writer.close() == 1
    assert writer.frames[0][1] == 4 * MIB + 1
