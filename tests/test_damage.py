"""Damaged archives: every line before the damage kept once, the damage reported.

The expected lines come from python-zstandard fed one byte at a time, which
gets out of a damaged archive everything a decoder can, independently of the
job's reader and its frame walker.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import lzma
import os
import struct

import pytest
import zstandard

from beam_pipeline.synth import SynthSpec, generate
from tests.helpers import dead_letters, real_sample, run, run_cli, written_records
from transforms.zstd_frames import MAX_WINDOW_SIZE, read_seek_table

RC_2005 = "RC_2005-12.zst"
RC_2006 = "RC_2006-01.zst"
CUT_SHORT = "line cut short by archive damage"
SKIPPABLE_MAGIC = 0x184D2A50


def reference_decode(data: bytes) -> tuple[bytes, bool]:
    """What a decoder gets out of ``data`` before any damage, and whether any.

    Frames are decoded one byte at a time, so a failing call costs only the
    block it fails on. Damage is an error, a stream that ends inside a
    frame, or an empty file.
    """
    if not data:
        return b"", True
    output = bytearray()
    rest = data
    while rest:
        decoder = zstandard.ZstdDecompressor(
            max_window_size=MAX_WINDOW_SIZE
        ).decompressobj()
        used = 0
        try:
            while used < len(rest) and not decoder.eof:
                output += decoder.decompress(rest[used : used + 1])
                used += 1
        except zstandard.ZstdError:
            return bytes(output), True
        if not decoder.eof:
            return bytes(output), True
        rest = rest[used:]
    return bytes(output), False


def _is_record(line: bytes) -> bool:
    try:
        value = json.loads(line.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict)


def expected_records(output: bytes, damaged: bool) -> list[bytes]:
    """The lines of ``output`` a reader should write, as it should write them.

    A last line without a newline is a record only when nothing damaged the
    archive after it; otherwise it was cut short.
    """
    lines = output.split(b"\n")
    tail = lines.pop()
    if tail and not damaged:
        lines.append(tail)
    records = []
    for line in lines:
        line = line.removesuffix(b"\r").removeprefix(b"\xef\xbb\xbf")
        if _is_record(line):
            records.append(line)
    return records


def block_starts(data: bytes) -> list[int]:
    """Compressed offsets of each block header and checksum (RFC 8878)."""
    starts = []
    offset = 0
    while offset + 8 <= len(data):
        (magic,) = struct.unpack_from("<I", data, offset)
        if SKIPPABLE_MAGIC <= magic <= SKIPPABLE_MAGIC + 15:
            offset += 8 + struct.unpack_from("<I", data, offset + 4)[0]
            continue
        descriptor = data[offset + 4]
        single_segment = descriptor & 0x20
        offset += (
            5
            + (0 if single_segment else 1)
            + (0, 1, 2, 4)[descriptor & 3]
            + (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        )
        while offset + 3 <= len(data):
            starts.append(offset)
            header = int.from_bytes(data[offset : offset + 3], "little")
            offset += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)
            if header & 1:
                break
        if descriptor & 0x04:
            starts.append(offset)
            offset += 4
    return starts


def write(folder, name: str, data: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def read_real(name: str) -> bytes:
    with open(real_sample(name), "rb") as handle:
        return handle.read()


def run_on(tmp_path, files: dict[str, bytes], *arguments: str) -> tuple[dict, str]:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        write(folder, name, data)
    output = str(tmp_path / "out")
    summary = run([f"--input={folder}/*", f"--output={output}", *arguments])
    return summary, output


def damage_by_archive(summary: dict) -> dict[str, tuple[int, int, str]]:
    return {
        report["archive"]: (
            report["compressed_offset"],
            report["decompressed_offset"],
            report["reason"],
        )
        for report in summary["damaged_archives"]
    }


def cut_short_letters(output: str) -> dict[str, tuple[int, int, str]]:
    return {
        letter["archive"]: (letter["offset"], letter["length"], letter["line"])
        for letter in dead_letters(output)
        if letter["reason"] == CUT_SHORT
    }


def check_against_reference(
    files: dict[str, bytes], summary: dict, output: str
) -> None:
    """Written records, damage and cut lines of each archive, as decoded."""
    expected: collections.Counter = collections.Counter()
    damage = damage_by_archive(summary)
    cut = cut_short_letters(output)
    for name, data in files.items():
        decoded, damaged = reference_decode(data)
        expected.update(expected_records(decoded, damaged))
        assert (name in damage) == damaged, name
        if damaged:
            assert damage[name][1] == len(decoded), name
        tail_start = decoded.rfind(b"\n") + 1
        if damaged and tail_start < len(decoded):
            tail = decoded[tail_start:]
            assert cut[name] == (
                tail_start,
                len(tail),
                tail[:4096].decode("utf-8", "backslashreplace"),
            ), name
        else:
            assert name not in cut, name
    assert collections.Counter(written_records(output)) == expected


def test_truncation_keeps_every_line_decoded_before_the_cut(real_data, tmp_path):
    source = read_real(RC_2005)
    blocks = block_starts(source)
    cuts = {
        "in_magic": 3,
        "in_header": 5,
        "in_first_block": 100,
        "block_boundary": blocks[3],
        "after_boundary": blocks[3] + 1,
        "middle": len(source) // 2,
        "no_checksum": len(source) - 4,
        "last_byte": len(source) - 1,
    }
    files = {f"RC_{name}.zst": source[:cut] for name, cut in cuts.items()}
    files["RC_2006-01.zst"] = read_real(RC_2006)

    summary, output = run_on(tmp_path, files)

    check_against_reference(files, summary, output)
    damage = damage_by_archive(summary)
    for name, cut in cuts.items():
        compressed, _, reason = damage[f"RC_{name}.zst"]
        assert compressed == cut
        assert reason == (
            f"archive ends inside the frame that starts at compressed byte 0"
            f" (truncated after {cut} compressed bytes)"
        )
    # Pinned figures of the sample: cut in the middle, 436 whole lines decode
    # and the 437th is cut after 421 bytes.
    assert damage["RC_middle.zst"][1] == 262144
    assert cut_short_letters(output)["RC_middle.zst"][:2] == (261723, 421)
    assert "RC_2006-01.zst" not in damage
    # Each record read once: the whole of the intact archive, and the 0, 0,
    # 0, 436, 436, 436, 1075 and 1075 records before each cut.
    assert summary["records_read"] == len(written_records(output)) == 3666 + 3458
    assert summary["archives_damaged"] == len(cuts)
    assert summary["status"] == "failed: damaged archives"


def test_truncation_at_each_block_boundary_with_small_reads(real_data, tmp_path):
    # The C decoder stops at the end of its input: a cut right after a block
    # would lose the part of the block that did not fit the last read.
    source = read_real(RC_2006)
    files = {f"RC_cut{cut:07d}.zst": source[:cut] for cut in block_starts(source)[1:]}

    summary, output = run_on(
        tmp_path, files, "--block_bytes=1024", "--read_chunk_bytes=1024"
    )

    check_against_reference(files, summary, output)
    # Cut before the checksum, every record of the sample is there.
    no_checksum = f"RC_cut{len(source) - 4:07d}.zst"
    assert damage_by_archive(summary)[no_checksum][1] == 2127651
    assert summary["archives_damaged"] == len(files) == 18


def test_corrupt_block_keeps_the_lines_of_every_block_before_it(real_data, tmp_path):
    source = bytearray(read_real(RC_2006))
    flipped = len(source) // 2
    source[flipped] ^= 0xFF
    files = {"RC_2006-01.zst": bytes(source)}

    summary, output = run_on(tmp_path, files)

    check_against_reference(files, summary, output)
    compressed, decompressed, reason = damage_by_archive(summary)["RC_2006-01.zst"]
    bad_block = max(start for start in block_starts(bytes(source)) if start <= flipped)
    assert compressed == bad_block == 181990
    assert decompressed == 917504
    assert (
        reason
        == "zstd could not decode the archive: zstd decompress error: Data corruption detected"
    )
    assert len(written_records(output)) == summary["records_read"] == 1585


def test_bad_checksum_keeps_every_line_and_reports_the_checksum(real_data, tmp_path):
    source = bytearray(read_real(RC_2005))
    source[-1] ^= 0x01
    files = {"RC_2005-12.zst": bytes(source)}

    summary, output = run_on(tmp_path, files)

    check_against_reference(files, summary, output)
    assert damage_by_archive(summary)["RC_2005-12.zst"] == (
        len(source) - 4,
        678432,
        "zstd could not decode the archive: zstd decompress error: Restored data doesn't match checksum",
    )
    assert len(written_records(output)) == 1075


def test_garbage_after_the_last_frame(real_data, tmp_path):
    source = read_real(RC_2005)
    files = {
        "RC_text.zst": source + b"this is not zstd\n",
        "RC_zeros.zst": source + bytes(4096),
    }

    summary, output = run_on(tmp_path, files)

    check_against_reference(files, summary, output)
    at = len(source)
    assert damage_by_archive(summary) == {
        "RC_text.zst": (
            at,
            678432,
            f"expected a zstd frame at compressed byte {at}, found magic 0x73696874 (plain text)",
        ),
        "RC_zeros.zst": (
            at,
            678432,
            f"expected a zstd frame at compressed byte {at}, found magic 0x00000000 (zero bytes)",
        ),
    }
    assert len(written_records(output)) == 2 * 1075


def test_files_that_are_not_zstd_are_named_for_what_they_are(real_data, tmp_path):
    lines = b"".join(
        line + b"\n" for line in expected_records(*reference_decode(read_real(RC_2005)))
    )
    files = {
        "RC_empty.zst": b"",
        "RC_json.zst": lines,
        "RC_gzip.zst": gzip.compress(lines),
        "RC_xz.zst": lzma.compress(lines),
        "RC_bz2.zst": bz2.compress(lines),
        "RC_legacy.zst": struct.pack("<I", 0xFD2FB527) + bytes(32),
    }

    summary, output = run_on(tmp_path, files)

    found = {
        "RC_json.zst": "0x6f63227b (uncompressed JSON text)",
        "RC_gzip.zst": "0x00088b1f (a gzip file)",
        "RC_xz.zst": "0x587a37fd (an xz file)",
        "RC_bz2.zst": "0x39685a42 (a bzip2 file)",
        "RC_legacy.zst": "0xfd2fb527 (a frame of zstd's pre-1.0 format, which is not supported)",
    }
    expected = {
        name: (0, 0, f"expected a zstd frame at compressed byte 0, found magic {magic}")
        for name, magic in found.items()
    }
    expected["RC_empty.zst"] = (
        0,
        0,
        "the archive is empty: a .zst file of 0 bytes holds no zstd frame",
    )
    assert damage_by_archive(summary) == expected
    assert written_records(output) == []
    assert dead_letters(output) == []
    assert summary["records_read"] == 0


def test_unusual_but_valid_archives_read_whole(real_data, tmp_path):
    plain = reference_decode(read_real(RC_2006))[0]
    half = plain.rfind(b"\n", 0, len(plain) // 2) + 1
    small_window = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=10, write_content_size=0
    )
    large_window = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=31, enable_ldm=1, write_checksum=1
    )
    first = zstandard.ZstdCompressor(compression_params=small_window).compress(
        plain[:half]
    )
    second = zstandard.ZstdCompressor(compression_params=large_window).compress(
        plain[half:]
    )
    skippable = struct.pack("<II", SKIPPABLE_MAGIC + 7, 5) + b"notes"
    empty_frame = zstandard.ZstdCompressor().compress(b"")
    files = {
        "RC_empty_frame.zst": empty_frame,
        "RC_only_skippable.zst": skippable,
        "RC_empty_then_data.zst": empty_frame + read_real(RC_2005),
        "RC_two_windows.zst": first + second,
        "RC_skippable_around.zst": skippable + first + skippable + second + skippable,
    }

    summary, output = run_on(tmp_path, files)

    check_against_reference(files, summary, output)
    assert summary["damaged_archives"] == []
    assert summary["records_read"] == 1075 + 2 * 3666
    assert summary["status"] == "succeeded"


def test_truncated_inside_a_skippable_frame_names_where_it_starts(real_data, tmp_path):
    source = read_real(RC_2005)
    skippable = struct.pack("<II", SKIPPABLE_MAGIC, 100) + bytes(100)
    files = {"RC_x.zst": source + skippable[:50]}

    summary, output = run_on(tmp_path, files)

    check_against_reference(files, summary, output)
    assert damage_by_archive(summary)["RC_x.zst"] == (
        len(source) + 50,
        678432,
        f"archive ends inside the frame that starts at compressed byte {len(source)}"
        f" (truncated after {len(source) + 50} compressed bytes)",
    )


def test_frame_asking_for_a_two_terabyte_window_is_refused(real_data, tmp_path):
    source = bytearray(read_real(RC_2005))
    # The window byte follows the magic and the frame descriptor: exponent
    # 31 asks for 2**41 bytes.
    source[5] = 31 << 3
    files = {"RC_x.zst": bytes(source)}

    summary, output = run_on(tmp_path, files)

    compressed, decompressed, reason = damage_by_archive(summary)["RC_x.zst"]
    assert (compressed, decompressed) == (0, 0)
    assert reason == (
        "zstd could not decode the archive: zstd decompress error:"
        " Frame requires too much memory for decoding"
    )
    assert written_records(output) == []


def test_seek_table_that_disagrees_with_the_frames(tmp_path):
    path = str(tmp_path / "seekable.zst")
    generate(path, SynthSpec(records=2000, seed=5), frame_bytes=200_000)
    with open(path, "rb") as handle:
        source = handle.read()
        table = read_seek_table(handle, len(source))
    entries = len(source) - 9 - 8 * len(table)
    wrong_size = bytearray(source)
    struct.pack_into("<I", wrong_size, entries + 8 + 4, table[1][1] + 5000)
    wrong_place = bytearray(source)
    struct.pack_into("<I", wrong_place, entries + 8, table[1][0] + 10)
    files = {
        "RC_wrong_size.zst": bytes(wrong_size),
        "RC_wrong_place.zst": bytes(wrong_place),
    }

    summary, output = run_on(tmp_path, files, "--desired_split_bytes=150000")

    second = table[0][0]
    assert damage_by_archive(summary) == {
        "RC_wrong_size.zst": (
            second,
            table[0][1],
            f"the zstd frame at compressed byte {second} holds {table[1][1]} bytes,"
            f" its seek table entry says {table[1][1] + 5000}: the table is wrong",
        )
    }
    # A table whose frames do not fill the file is not used: that archive is
    # read whole. The wrong size costs the second frame, and the third,
    # whose reader starts in the second to see whether a line starts with
    # the third.
    every = expected_records(*reference_decode(source))
    lost = sum(
        len(expected_records(*reference_decode(source[start : start + size])))
        for start, size in ((second, table[1][0]), (second + table[1][0], table[2][0]))
    )
    written = collections.Counter(written_records(output))
    assert written - collections.Counter(every * 2) == collections.Counter()
    assert max(written.values()) == 2
    assert sum(written.values()) == 2 * len(every) - lost == 4000 - 297


@pytest.mark.parametrize("tolerate", [False, True])
def test_damage_sets_the_exit_status_and_lists_the_archives(
    real_data, tmp_path, tolerate
):
    source = read_real(RC_2005)
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder, "RC_2005-12.zst", source)
    write(folder, "RC_cut.zst", source[:70000])
    arguments = [f"--input={folder}/*.zst", f"--output={tmp_path / 'out'}"]

    process = run_cli(
        arguments + (["--tolerate_damage"] if tolerate else []), timeout=300
    )

    assert process.returncode == (0 if tolerate else 1), process.stderr
    status = (
        "succeeded with damaged archives" if tolerate else "failed: damaged archives"
    )
    assert f"status: {status}" in process.stdout
    assert (
        "damaged: RC_cut.zst at compressed byte 70000, decompressed byte 262,144:"
        " archive ends inside the frame that starts at compressed byte 0"
        " (truncated after 70000 compressed bytes)"
    ) in process.stdout.replace("70,000", "70000")
    assert "Traceback" not in process.stderr
    with open(tmp_path / "out" / "_summary.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    assert [report["archive"] for report in saved["damaged_archives"]] == ["RC_cut.zst"]
    assert saved["records_written"] == 1075 + 436
