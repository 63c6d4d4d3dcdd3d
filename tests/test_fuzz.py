"""Randomly damaged archives: no crash, no hang, nothing lost before the damage.

Each round damages one copy of each base archive at random (a cut, flipped
bits, inserted, zeroed, copied or removed bytes, garbage appended), runs the
job on all of them at once and checks each archive against what
python-zstandard, fed one byte at a time, gets out of the same bytes. The
rounds are seeded, so a failure names the round that reproduces it; the
test stops starting rounds after ``PUSHSHIFT_FUZZ_SECONDS`` (default 30);
``PUSHSHIFT_FUZZ_FIRST_SEED`` starts elsewhere.
"""

from __future__ import annotations

import collections
import json
import os
import random
import struct
import tempfile
import time

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beam_pipeline.seekable import SeekableWriter
from beam_pipeline.synth import SynthSpec, generate, record_lines
from tests.helpers import dead_letters, real_sample, run, written_records
from tests.test_damage import (
    CUT_SHORT,
    SKIPPABLE_MAGIC,
    expected_records,
    reference_decode,
)
from transforms.zstd_frames import read_seek_table

FUZZ_SECONDS = float(os.environ.get("PUSHSHIFT_FUZZ_SECONDS", "30"))
# Another first seed explores other damage; CI always runs the same rounds.
FIRST_SEED = int(os.environ.get("PUSHSHIFT_FUZZ_FIRST_SEED", "1000"))


def _compress_lines(
    spec: SynthSpec, params: zstandard.ZstdCompressionParameters
) -> bytes:
    return zstandard.ZstdCompressor(compression_params=params).compress(
        b"".join(record_lines(spec))
    )


@pytest.fixture(scope="module")
def bases(real_data, tmp_path_factory) -> dict[str, tuple[bytes, int]]:
    """Archives of every layout, each with records of its own.

    Each maps to (bytes, where its seek table starts or its size if none,
    where the frames start that readers may be given one by one).
    """
    folder = tmp_path_factory.mktemp("fuzz-bases")
    made: dict[str, tuple[bytes, int]] = {}
    for name in ("RC_2005-12.zst", "RC_2006-01.zst"):
        with open(real_sample(name), "rb") as handle:
            data = handle.read()
        made[name] = (data, len(data))

    window = str(folder / "window.zst")
    generate(window, SynthSpec(records=400, seed=11), window_log=20)
    seekable = str(folder / "seekable.zst")
    generate(
        seekable,
        SynthSpec(kind="submissions", records=300, seed=12),
        frame_bytes=50_000,
    )
    for name, path in (("window_2_20.zst", window), ("seekable.zst", seekable)):
        with open(path, "rb") as handle:
            data = handle.read()
        made[name] = (data, len(data))
    data = made["seekable.zst"][0]
    with open(seekable, "rb") as handle:
        table = read_seek_table(handle, len(data))
    starts = [sum(size for size, _ in table[:number]) for number in range(len(table))]
    made["seekable.zst"] = (data, len(data) - 17 - 8 * len(table), starts)

    no_checksum = zstandard.ZstdCompressionParameters.from_level(
        3, write_checksum=0, write_content_size=1
    )
    made["no_checksum.zst"] = (
        _compress_lines(SynthSpec(month="2010-06", records=400, seed=13), no_checksum),
        0,
    )
    small = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=12, write_checksum=1
    )
    large = zstandard.ZstdCompressionParameters.from_level(
        9, window_log=31, enable_ldm=1, write_checksum=1
    )
    skippable = struct.pack("<II", SKIPPABLE_MAGIC + 3, 6) + b"fuzzed"
    first = (
        _compress_lines(SynthSpec(month="2024-06", records=200, seed=14), small)
        + skippable
    )
    made["two_frames.zst"] = (
        first
        + _compress_lines(SynthSpec(month="2024-06", records=200, seed=15), large),
        0,
        [0, len(first)],
    )
    return {
        name: (entry[0], entry[1] or len(entry[0]), entry[2] if len(entry) > 2 else [0])
        for name, entry in made.items()
    }


def frame_records(data: bytes, starts: list[int]) -> collections.Counter:
    """What a decoder gets out of each frame read on its own."""
    records: collections.Counter = collections.Counter()
    for start, end in zip(starts, starts[1:] + [len(data)], strict=True):
        records.update(expected_records(*reference_decode(data[start:end])))
    return records


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes, int]:
    """A damaged copy of ``data``, what was done and where."""
    kind = rng.choice(["cut", "flip", "insert", "zero", "copy", "remove", "append"])
    at = rng.randrange(len(data) + 1)
    if kind == "cut":
        return f"cut at {at}", data[:at], at
    if kind == "flip":
        damaged = bytearray(data)
        spots = sorted(rng.randrange(len(data)) for _ in range(rng.randint(1, 3)))
        for spot in spots:
            damaged[spot] ^= 1 << rng.randrange(8)
        return f"bits flipped at {spots}", bytes(damaged), spots[0]
    if kind == "insert":
        garbage = rng.randbytes(rng.randint(1, 64))
        return (
            f"{len(garbage)} random bytes inserted at {at}",
            data[:at] + garbage + data[at:],
            at,
        )
    if kind == "zero":
        size = rng.randint(1, 4096)
        return (
            f"{size} bytes zeroed at {at}",
            data[:at] + bytes(len(data[at : at + size])) + data[at + size :],
            at,
        )
    if kind == "copy":
        source = rng.randrange(len(data))
        return (
            f"100 bytes from {source} copied to {at}",
            data[:at] + data[source : source + 100] + data[at:],
            at,
        )
    if kind == "remove":
        size = rng.randint(1, 512)
        return f"{size} bytes removed at {at}", data[:at] + data[at + size :], at
    garbage = rng.choice([b"\n", b"{}", rng.randbytes(rng.randint(1, 300))])
    return f"{len(garbage)} bytes appended", data + garbage, len(data)


def check_archive(
    name: str,
    data: bytes,
    mode: str,
    frames: collections.Counter,
    written: collections.Counter,
    reports: dict,
) -> collections.Counter:
    """Checks one archive's records and reports; returns what it may write.

    ``mode`` is "exact" where one reader reads the archive from its start;
    "frames" where readers split it at frames, so that the frames after the
    damage are read too, each as far as it can be (``frames``); "table"
    where the damage hit its seek table, which may cost records if reported.
    """
    decoded, damaged = reference_decode(data)
    expected = collections.Counter(expected_records(decoded, damaged))
    allowed = expected | frames if mode == "frames" else expected
    mine = collections.Counter(
        {line: count for line, count in written.items() if line in allowed}
    )
    damage = reports["damage"].get(name, [])
    if mode == "table":
        assert mine <= expected, f"{name}: a record written more often than decoded"
        if mine != expected:
            assert damage, f"{name}: records lost without a damage report"
        return allowed
    if mode == "exact":
        assert mine == expected, f"{name}: records differ from what the decoder gets"
    else:
        assert mine - expected <= frames, f"{name}: records not decoded from any frame"
        assert expected <= mine, (
            f"{name}: records decoded before the damage are missing"
        )
    assert bool(damage) == damaged, (
        f"{name}: damage {damage}, the decoder says {damaged}"
    )
    if damaged:
        first = min(damage, key=lambda report: report["decompressed_offset"])
        assert first["decompressed_offset"] == len(decoded), name
        assert 0 <= first["compressed_offset"] <= len(data), name
        tail_start = decoded.rfind(b"\n") + 1
        cut = [
            (letter["offset"], letter["length"])
            for letter in reports["cut"].get(name, [])
            if letter["offset"] < len(decoded)
        ]
        expected_cut = (
            [(tail_start, len(decoded) - tail_start)]
            if tail_start < len(decoded)
            else []
        )
        assert cut == expected_cut, name
    return allowed


@pytest.mark.timeout(600)
def test_randomly_damaged_archives_keep_every_record_before_the_damage(bases, tmp_path):
    started = time.monotonic()
    rounds = 0
    while rounds < 3 or time.monotonic() - started < FUZZ_SECONDS:
        seed = FIRST_SEED + rounds
        rng = random.Random(seed)
        folder = tmp_path / f"round{rounds}"
        folder.mkdir()
        split = rng.random() < 0.5
        archives = {}
        for number, (base, (data, table_start, starts)) in enumerate(
            sorted(bases.items())
        ):
            what, damaged, at = mutate(rng, data)
            name = f"RC_{number}_{base}"
            (folder / name).write_bytes(damaged)
            if at >= table_start:
                mode = "table"
            elif split and base in ("seekable.zst", "two_frames.zst"):
                mode = "frames"
            else:
                mode = "exact"
            archives[name] = (damaged, mode, starts, f"{base}: {what}")
        arguments = [
            f"--input={folder}/RC_*",
            f"--output={folder / 'out'}",
            f"--block_bytes={rng.choice([1024, 4096, 65536, 2**20])}",
            f"--read_chunk_bytes={rng.choice([1024, 16384, 2**20])}",
            f"--desired_split_bytes={20_000 if split else 256 * 2**20}",
            # Every line is judged against the decoder, none abandoned.
            "--max_bad_line_share=1",
        ]

        summary = run(arguments)

        context = f"round {rounds} (seed {seed}), {arguments[2:5]}: " + "; ".join(
            what for _, _, _, what in archives.values()
        )
        output = str(folder / "out")
        written = collections.Counter(written_records(output))
        reports: dict = {
            "damage": collections.defaultdict(list),
            "cut": collections.defaultdict(list),
        }
        for report in summary["damaged_archives"]:
            reports["damage"][report["archive"]].append(report)
        for letter in dead_letters(output):
            if letter["reason"] == CUT_SHORT:
                reports["cut"][letter["archive"]].append(letter)
        try:
            expected: collections.Counter = collections.Counter()
            for name, (data, mode, starts, _) in archives.items():
                frames = (
                    frame_records(data, starts)
                    if mode == "frames"
                    else collections.Counter()
                )
                expected += check_archive(name, data, mode, frames, written, reports)
            assert written - expected == collections.Counter(), (
                "records no decoder produced"
            )
            assert all(
                len(letter["line"]) <= 4 * 4096 for letter in dead_letters(output)
            )
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from exc
        assert summary["status"] == (
            "failed: damaged archives" if reports["damage"] else "succeeded"
        ), context
        rounds += 1


def _line_kinds():
    """Strategies for one line and what the job should make of it."""
    text = st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=40
    )
    record = st.builds(
        lambda name, body, pad: (
            json.dumps(
                {"subreddit": name, "body": body + "z" * pad}, ensure_ascii=False
            ).encode(),
            "record",
        ),
        text,
        text,
        st.one_of(st.just(0), st.integers(0, 3000), st.integers(3000, 12000)),
    )
    garbage = st.binary(max_size=80).filter(
        lambda raw: (
            raw.strip()
            and b"\n" not in raw
            and b"\r" not in raw
            and not expected_records(raw.removeprefix(b"\xef\xbb\xbf"), False)
        )
    )
    return st.one_of(
        record,
        record,
        record,
        st.builds(lambda raw: (raw, "other"), garbage),
        st.sampled_from(
            [(b"", "blank"), (b"   ", "blank"), (b"[1]", "other"), (b"null", "other")]
        ),
        st.integers(5000, 30000).map(lambda size: (b"x" * size, "other")),
    )


@settings(
    max_examples=int(os.environ.get("PUSHSHIFT_FUZZ_LINE_EXAMPLES", "20")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    lines=st.lists(_line_kinds(), min_size=1, max_size=60),
    final_newline=st.booleans(),
    layout=st.sampled_from(["ndjson", "frame", "frames"]),
    block_bytes=st.sampled_from([1024, 4096, 65536]),
    chunk_bytes=st.sampled_from([1024, 65536]),
    max_record=st.sampled_from([4096, 8192]),
    split=st.sampled_from([0, 3000, 20000]),
)
def test_every_line_is_a_record_a_blank_or_a_dead_letter_once(
    lines, final_newline, layout, block_bytes, chunk_bytes, max_record, split
):
    content = b"\n".join(line for line, _ in lines) + (b"\n" if final_newline else b"")
    records, letters, blanks = [], [], 0
    offset = 0
    for line, kind in lines:
        if kind == "record" and len(line) <= max_record:
            records.append(line)
        elif kind == "blank":
            blanks += 1
        elif line or offset < len(content):
            letters.append((offset, len(line)))
        offset += len(line) + 1
    if not final_newline and lines[-1][0] == b"" and lines[-1][1] == "blank":
        blanks -= 1  # an empty last line without a newline is no line
    with tempfile.TemporaryDirectory(prefix="pushshift-lines-") as folder:
        if layout == "ndjson":
            path = os.path.join(folder, "RS_lines.ndjson")
            with open(path, "wb") as handle:
                handle.write(content)
        else:
            path = os.path.join(folder, "RS_lines.zst")
            with open(path, "wb") as handle:
                if layout == "frame":
                    handle.write(zstandard.ZstdCompressor().compress(content))
                else:
                    writer = SeekableWriter(handle, frame_bytes=5000)
                    writer.write(content)
                    writer.close()
        output = os.path.join(folder, "out")

        summary = run(
            [
                f"--input={path}",
                f"--output={output}",
                f"--block_bytes={block_bytes}",
                f"--read_chunk_bytes={chunk_bytes}",
                f"--max_record_bytes={max_record}",
                f"--desired_split_bytes={split}",
                "--max_bad_line_share=1",
            ]
        )

        assert collections.Counter(written_records(output)) == collections.Counter(
            records
        )
        assert [
            (letter["offset"], letter["length"]) for letter in dead_letters(output)
        ] == letters
        assert summary["blank_lines"] == blanks
        assert summary["damaged_archives"] == []
