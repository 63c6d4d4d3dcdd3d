"""Bad lines, odd fields and user mistakes: kept, dead-lettered or refused.

Each test pins what the job does with one kind of bad input: which lines
become records, byte for byte, which go to the dead letters with their
offset and reason, and which arguments stop the job before it starts.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import zstandard

from beam_pipeline.cli import main
from tests.helpers import (
    PROJECT_ROOT,
    dead_letters,
    read_batches,
    real_sample,
    run,
    run_cli,
    summary,
    written_records,
)

GOOD = b'{"subreddit":"a","author":"x","created_utc":1}'
NOT_AN_OBJECT = "not an object"

# (line, what becomes of it): a record, a blank line, or a dead letter with
# its reason.
LINES = [
    (b"\xef\xbb\xbf" + GOOD, GOOD),
    (
        b"not json",
        "not valid JSON: invalid literal, expected 'null': line 1 column 1 (char 0)",
    ),
    (b"[1,2]", "JSON array, not an object"),
    (b'"text"', "JSON string, not an object"),
    (b"42", "JSON number, not an object"),
    (b"null", "JSON null, not an object"),
    (b'{"subreddit":"caf\xe9","created_utc":2}', "record"),
    (
        b'{"subreddit":"a","body":"nul \x00 raw","created_utc":3}',
        "not valid JSON: unexpected control character in string: line 1 column 30 (char 29)",
    ),
    (
        b"\x00\x00\x00",
        "not valid JSON: unexpected character, expected a JSON value: line 1 column 1 (char 0)",
    ),
    (b'{"a":' * 2000 + b"1" + b"}" * 2000, "JSON nested too deeply to parse"),
    (b'{"subreddit":"deep","a":' + b"[" * 1000 + b"]" * 1000 + b"}", "record"),
    (b'{"subreddit":"a","n":123456789012345678901234567890,"created_utc":4}', "record"),
    (b"", "blank"),
    (b"   ", "blank"),
    (GOOD + b"\r", GOOD),
    (b"\r", "blank"),
    (b'{"subreddit":"\\ud800x","created_utc":5}', "record"),
    # Parsed by the standard library (orjson refuses the lone surrogate),
    # which reads the integer exactly, beyond what orjson can write.
    (b'{"subreddit":"a","n":-123456789012345678901234567890,"s":"\\udc00"}', "record"),
    (
        b'{"subreddit":"a","x":NaN}',
        "not valid JSON: unexpected character, expected a JSON value: line 1 column 22 (char 21)",
    ),
    (b'{"subreddit":"a","x":1e999,"created_utc":6}', "record"),
    (
        b'{"subreddit":"a"} {"b":1}',
        "not valid JSON: unexpected content after document: line 1 column 19 (char 18)",
    ),
]


def lines_file(folder, name: str, lines: list[bytes], compress: bool = False) -> str:
    data = b"\n".join(lines) + b"\n"
    if compress:
        data = zstandard.ZstdCompressor().compress(data)
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def expected_outcome(lines) -> tuple[list[bytes], list[tuple[int, str, int]]]:
    """The records and (offset, reason, length) dead letters LINES asks for."""
    records, letters = [], []
    offset = 0
    for line, outcome in lines:
        if outcome == "record":
            records.append(line)
        elif isinstance(outcome, bytes):
            records.append(outcome)
        elif outcome != "blank":
            letters.append((offset, outcome, len(line)))
        offset += len(line) + 1
    return records, letters


def test_lines_that_are_not_records_go_to_dead_letters(tmp_path):
    lines = [line for line, _ in LINES]
    lines_file(tmp_path, "RS_plain.ndjson", lines)
    lines_file(tmp_path, "RS_packed.zst", lines, compress=True)
    output = str(tmp_path / "out")

    result = run([f"--input={tmp_path}/RS_*", f"--output={output}"])

    records, letters = expected_outcome(LINES)
    assert collections.Counter(written_records(output)) == collections.Counter(
        records * 2
    )
    for archive in ("RS_packed.zst", "RS_plain.ndjson"):
        found = [
            (letter["offset"], letter["reason"], letter["length"])
            for letter in dead_letters(output)
            if letter["archive"] == archive
        ]
        assert found == letters
    nul = next(
        letter for letter in dead_letters(output) if letter["offset"] == letters[5][0]
    )
    assert nul["line"] == '{"subreddit":"a","body":"nul \x00 raw","created_utc":3}'
    assert "line_base64" not in nul
    assert result["records_read"] == 2 * 8
    assert result["dead_letters"] == 2 * 10
    assert result["blank_lines"] == 2 * 3
    # The line with a byte that is not UTF-8, and the two with a lone
    # surrogate escape, in each archive.
    assert result["invalid_utf8_records"] == 2 * 3
    assert result["damaged_archives"] == []


@pytest.mark.parametrize(
    "subreddit, line",
    [
        ("caf\ufffd", b'{"subreddit":"caf\xe9","created_utc":2}'),
        ("\ufffdx", b'{"subreddit":"\\ud800x","created_utc":5}'),
    ],
)
def test_filters_see_replacement_characters_and_the_line_is_kept_as_read(
    tmp_path, subreddit, line
):
    lines_file(tmp_path, "RS_x.ndjson", [entry for entry, _ in LINES])
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={tmp_path}/RS_x.ndjson",
            f"--output={output}",
            f"--subreddit={subreddit}",
        ]
    )

    assert written_records(output) == [line]
    assert result["records_matched"] == 1


def test_selected_fields_are_written_exactly(tmp_path):
    lines_file(tmp_path, "RS_x.ndjson", [entry for entry, _ in LINES])
    output = str(tmp_path / "out")

    run(
        [
            f"--input={tmp_path}/RS_x.ndjson",
            f"--output={output}",
            "--fields=subreddit,n,x",
        ]
    )

    # Integers beyond 64 bits keep every digit; a number beyond a double is
    # null, as orjson writes infinity; bad text is U+FFFD once re-serialised.
    assert sorted(written_records(output)) == sorted(
        [
            b'{"subreddit":"a"}',
            b'{"subreddit":"a"}',
            b'{"subreddit":"a","n":123456789012345678901234567890}',
            b'{"subreddit":"a","x":null}',
            '{"subreddit":"caf\ufffd"}'.encode(),
            b'{"subreddit":"deep"}',
            '{"subreddit":"\ufffdx"}'.encode(),
            b'{"subreddit":"a","n":-123456789012345678901234567890}',
        ]
    )


def oversized_lines() -> list[bytes]:
    def record(size: int) -> bytes:
        return b'{"subreddit":"a","body":"' + b"y" * (size - 27) + b'"}'

    return [GOOD, record(3000), GOOD, record(10000), GOOD, record(5000)]


@pytest.mark.parametrize(
    "reads, suffix",
    [
        # Blocks smaller than a line: the reader sees the long lines grow.
        (
            ["--block_bytes=1024", "--read_chunk_bytes=1024"],
            "; kept its first 4096 bytes",
        ),
        # Blocks larger than a line: the parser sees the long lines whole.
        (["--block_bytes=65536"], ""),
    ],
)
def test_lines_longer_than_the_limit_are_dead_lettered_truncated(
    tmp_path, reads, suffix
):
    lines = oversized_lines()
    # The last line has no newline: it ends the file.
    path = tmp_path / "RS_long.ndjson"
    path.write_bytes(b"\n".join(lines))
    output = str(tmp_path / "out")

    result = run(
        [f"--input={path}", f"--output={output}", "--max_record_bytes=4096", *reads]
    )

    assert sorted(written_records(output)) == sorted([GOOD, lines[1], GOOD, GOOD])
    letters = dead_letters(output)
    assert [
        (letter["offset"], letter["length"], letter["truncated"]) for letter in letters
    ] == [
        (3095, 10000, True),
        (13143, 5000, True),
    ]
    assert [letter["reason"] for letter in letters] == [
        f"record of 10000 bytes exceeds --max_record_bytes (4096){suffix}",
        f"record of 5000 bytes exceeds --max_record_bytes (4096){suffix}",
    ]
    assert [letter["line"] for letter in letters] == [
        lines[3][:4096].decode(),
        lines[5][:4096].decode(),
    ]
    assert result["oversized_records"] == 2
    assert result["records_read"] == 4


def test_long_line_cut_by_damage_says_so(tmp_path):
    lines = oversized_lines()
    first = zstandard.ZstdCompressor().compress(b"\n".join(lines[:4]) + b"\n")
    # Text that does not compress, so that the second frame holds several
    # blocks and a cut inside it leaves some decoded.
    text = base64.b64encode(random.Random(3).randbytes(300_000))
    second = zstandard.ZstdCompressor().compress(
        b'{"body":"' + text + b'"}\n' + GOOD + b"\n"
    )
    path = tmp_path / "RS_cut.zst"
    path.write_bytes(first + second[: len(second) // 2])
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={path}",
            f"--output={output}",
            "--max_record_bytes=4096",
            "--block_bytes=1024",
        ]
    )

    [report] = result["damaged_archives"]
    assert report["reason"].startswith(
        "archive ends inside the frame that starts at compressed byte"
    )
    line_start = sum(len(line) + 1 for line in lines[:4])
    cut_length = report["decompressed_offset"] - line_start
    assert cut_length > 100_000
    assert written_records(output) == [GOOD, lines[1], GOOD]
    assert [
        (letter["offset"], letter["length"], letter["reason"])
        for letter in dead_letters(output)
    ] == [
        (
            3095,
            10000,
            "record of 10000 bytes exceeds --max_record_bytes (4096); kept its first 4096 bytes",
        ),
        (
            line_start,
            cut_length,
            f"record of at least {cut_length} bytes, cut short by archive damage, exceeds"
            " --max_record_bytes (4096); kept its first 4096 bytes",
        ),
    ]


def huge_line_archive(path: str, line_bytes: int) -> None:
    """Ten records, one line of ``line_bytes`` that is not one, ten more."""
    records = (GOOD + b"\n") * 10
    # A small window, so that the decoder's own memory stays small.
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=20)
    with open(path, "wb") as handle:
        writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(
            handle
        )
        writer.write(records + b'{"body":"')
        piece = b"x" * 2**20
        left = line_bytes - 11
        while left > 0:
            writer.write(piece[:left])
            left -= len(piece)
        writer.write(b'"}\n' + records)
        writer.close()


@pytest.mark.slow
def test_a_300_mb_line_is_dead_lettered_in_bounded_memory(tmp_path):
    limit = 64 * 2**20
    peaks = {}
    for name, size in (("small", 10_000), ("huge", 300 * 10**6)):
        folder = tmp_path / name
        folder.mkdir()
        huge_line_archive(str(folder / "RC_x.zst"), size)
        output = folder / "out"

        process = run_cli(
            [
                f"--input={folder}/RC_x.zst",
                f"--output={output}",
                f"--max_record_bytes={limit}",
            ]
        )

        assert process.returncode == 0, process.stderr
        saved = summary(str(output))
        peaks[name] = saved["peak_rss_bytes"]
        # The small archive's long line is a record of its own.
        assert written_records(str(output)).count(GOOD) == 20
        assert saved["records_written"] == 20 + (name == "small")

    letter = dead_letters(str(tmp_path / "huge" / "out"))[0]
    assert (letter["offset"], letter["length"], len(letter["line"])) == (
        470,
        300 * 10**6,
        4096,
    )
    assert saved["oversized_records"] == 1
    # The reader holds at most the limit and a read beside it, never the line.
    extra = peaks["huge"] - peaks["small"]
    assert extra < 3 * limit, peaks
    assert extra < 0.5 * 300 * 10**6, peaks


def typed_records() -> list[tuple[bytes, bool]]:
    """Records whose created_utc has every type, and whether 100-200 keeps them."""
    values = [
        (b"150", True),
        (b'"150"', True),
        (b"150.5", True),
        (b'"1.5e2"', True),
        (b"100", True),
        (b"200", False),
        (b"99", False),
        (b"null", False),
        (b"true", False),
        (b"[150]", False),
        (b'{"t":150}', False),
        (b'"abc"', False),
        (b'"nan"', False),
        (b'"inf"', False),
        (b'"1_50"', False),
        (b"1" + b"0" * 400, False),
    ]
    records = [
        (b'{"subreddit":"a","created_utc":' + value + b"}", keep)
        for value, keep in values
    ]
    records.append((b'{"subreddit":"a"}', False))
    return records


def test_created_utc_of_every_type_and_none(tmp_path):
    records = typed_records()
    lines_file(tmp_path, "RS_t.ndjson", [line for line, _ in records])
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={tmp_path}/RS_t.ndjson",
            f"--output={output}",
            "--since=100",
            "--until=200",
        ]
    )

    assert sorted(written_records(output)) == sorted(
        line for line, keep in records if keep
    )
    assert result["records_read"] == len(records)
    assert result["dead_letters"] == 0


@pytest.mark.parametrize("field", ["subreddit", "author"])
def test_missing_and_mistyped_names_do_not_match(tmp_path, field):
    values = [
        b'"A"',
        b'"a"',
        b'" a"',
        b'"a "',
        b"null",
        b"5",
        b'["a"]',
        b'{"a":1}',
        b"true",
        b'""',
    ]
    lines = [b'{"%s":%s,"created_utc":1}' % (field.encode(), value) for value in values]
    lines.append(b'{"created_utc":1}')
    lines_file(tmp_path, "RS_n.ndjson", lines)
    output = str(tmp_path / "out")

    run([f"--input={tmp_path}/RS_n.ndjson", f"--output={output}", f"--{field}=a"])

    assert sorted(written_records(output)) == sorted(lines[:2])


HOSTILE_NAMES = [
    "",
    "L" * 5000,
    "../../etc/passwd",
    "a/b",
    "a\\b",
    "..",
    ".",
    "a\u0000b",
    "CON",
    "nul",
    'a:b*c?d|e<f>g"h',
    "caf\u00e9",
    "\u65e5\u672c",
    "_missing",
    "_MISSING",
    " ",
    "\t",
]
# Values of the key field that are not names at all, each a key of its own.
ODD_VALUES = [b"null", b"5", b'"5"', b"true", b'"true"', b"[1]", b'{"a":1}', b"1.5"]
BATCH_NAME = re.compile(r"^[a-z0-9_]{1,60}-[0-9a-f]{10}-a\d{4}-\d{15}\.jsonl\.zst$")


@pytest.mark.parametrize("key", ["subreddit", "author"])
def test_key_names_cannot_leave_the_batches_folder_or_share_a_file(tmp_path, key):
    values = [json.dumps(name).encode() for name in HOSTILE_NAMES] + ODD_VALUES
    lines = [
        b'{"%s":%s,"n":%d}' % (key.encode(), value, number)
        for number, value in enumerate(values)
    ]
    lines.append(b'{"n":-1}')
    folder = tmp_path / "in"
    folder.mkdir()
    lines_file(folder, "RS_keys.ndjson", lines)
    output = tmp_path / "out"

    run(
        [
            f"--input={folder}/RS_keys.ndjson",
            f"--output={output}",
            f"--batch_key={key}",
            "--batch_size=1000",
        ]
    )

    batches = read_batches(str(output))
    assert all(BATCH_NAME.match(name) for name in batches), sorted(batches)
    # Names that differ only in case are one key; "null", "" and a missing
    # field are the missing key; every other value has a file of its own.
    groups = sorted(
        sorted(json.loads(line)["n"] for line in lines_of)
        for lines_of in batches.values()
    )
    missing = [
        -1,
        HOSTILE_NAMES.index(""),
        len(HOSTILE_NAMES) + ODD_VALUES.index(b"null"),
    ]
    one_name = [HOSTILE_NAMES.index("_missing"), HOSTILE_NAMES.index("_MISSING")]
    alone = [[n] for n in range(len(values)) if n not in missing + one_name]
    assert groups == sorted([sorted(missing), one_name, *alone])
    # Nothing was written outside the output folder, nor below batches/.
    written = [
        os.path.relpath(os.path.join(root, name), tmp_path).split(os.sep)
        for root, _, names in os.walk(tmp_path)
        for name in names
    ]
    assert {parts[0] for parts in written} == {"in", "out"}
    assert all(len(parts) == 3 for parts in written if parts[:2] == ["out", "batches"])
    assert len([parts for parts in written if parts[:2] == ["out", "batches"]]) == len(
        groups
    )


def test_mostly_garbage_is_abandoned_as_probably_not_a_dump(tmp_path):
    lines = [GOOD] * 100 + [b"garbage line %d" % number for number in range(2900)]
    lines_file(tmp_path, "RS_garbage.ndjson", lines)
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={tmp_path}/RS_garbage.ndjson",
            f"--output={output}",
            "--block_bytes=1024",
        ]
    )

    assert written_records(output) == [GOOD] * 100
    [report] = result["damaged_archives"]
    assert report["reason"] == (
        "probably not a Pushshift dump: 90% of 1034 lines do not start a JSON object"
        " (more than --max_bad_line_share 50%); stopped reading"
    )
    assert report["decompressed_offset"] == 20468
    # Read up to the block where the share was judged, not to the end.
    assert result["dead_letters"] == 934
    assert result["archives_abandoned"] == 1


def test_a_dump_with_some_bad_lines_is_read_to_the_end(tmp_path):
    lines = [b"oops" if number % 5 in (1, 3) else GOOD for number in range(3000)]
    lines_file(tmp_path, "RS_some.ndjson", lines)
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={tmp_path}/RS_some.ndjson",
            f"--output={output}",
            "--block_bytes=1024",
        ]
    )

    assert len(written_records(output)) == 1800
    assert result["dead_letters"] == 1200
    assert result["damaged_archives"] == []


def error_of(capsys, arguments: list[str]) -> str:
    status = main(arguments)
    captured = capsys.readouterr()
    assert status == 2, captured
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    return lines[-1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--input=<DIR>/RC_none.zst"],
            "error: --input '<DIR>/RC_none.zst' matches no file",
        ),
        (
            ["--input=<DIR>/RC_x.gz"],
            "error: --input '<DIR>/RC_x.gz' is neither a .zst archive nor a .ndjson/.jsonl file",
        ),
        (
            ["--input=<DIR>/RC_folder.zst"],
            "error: --input '<DIR>/RC_folder.zst' is a folder; name the archives in it or a glob",
        ),
        (
            ["--input=<DIR>/RC_fifo.zst"],
            "error: --input '<DIR>/RC_fifo.zst' is not a regular file",
        ),
        (
            ["--input=<IN>", "--output=<DIR>/a_file"],
            "error: --output '<DIR>/a_file' is a file, not a folder",
        ),
        (
            ["--input=<IN>", "--output=<DIR>/a_file/out"],
            "error: --output '<DIR>/a_file/out' cannot be written: [Errno 20] Not a directory",
        ),
        (
            ["--input=<IN>", "--max_record_bytes=100"],
            "error: --max_record_bytes must be at least 1024, not 100",
        ),
        (
            ["--input=<IN>", "--read_chunk_bytes=0"],
            "error: --read_chunk_bytes must be at least 1024, not 0",
        ),
        (
            ["--input=<IN>", "--max_bad_line_share=1.5"],
            "error: --max_bad_line_share must be in (0, 1], not 1.5",
        ),
        (
            ["--input=<IN>", "--num_shards=0"],
            "error: --num_shards must be at least 1, not 0",
        ),
        (
            ["--input=<IN>", "--since=100", "--until=100"],
            "error: --since 100 is not before --until 100",
        ),
        (
            ["--input=<IN>", "--until=tomorrow"],
            "error: --until 'tomorrow' is neither an ISO date (2024-01-31) nor epoch seconds",
        ),
        (
            ["--input=<IN>", "--batch_max_buffering_secs=-1"],
            "error: --batch_max_buffering_secs must be positive, not -1.0",
        ),
        (
            ["--input=<IN>", "--max_memory_mb=10"],
            "error: --max_memory_mb must be at least 64, not 10",
        ),
        (
            ["--input=<IN>", "--fan_out=sometimes"],
            "error: --fan_out must be on, off or auto, not 'sometimes'",
        ),
        (
            ["--input=<IN>", "--desired_split_bytes=-1"],
            "error: --desired_split_bytes must not be negative, not -1",
        ),
        (
            ["--input=<IN>", "--subreddit="],
            "error: --subreddit '' holds an empty name; an empty filter would keep every record",
        ),
        (
            ["--input=<IN>", "--author=bob,"],
            "error: --author 'bob,' holds an empty name; an empty filter would keep every record",
        ),
    ],
)
def test_bad_arguments_stop_the_job_with_one_line(
    real_data, tmp_path, capsys, arguments, message
):
    os.mkfifo(tmp_path / "RC_fifo.zst")
    (tmp_path / "RC_folder.zst").mkdir()
    (tmp_path / "RC_x.gz").write_bytes(b"")
    (tmp_path / "a_file").write_bytes(b"")
    arguments = [
        argument.replace("<DIR>", str(tmp_path)).replace(
            "<IN>", real_sample("RC_2005-12.zst")
        )
        for argument in arguments
    ]
    if not any(argument.startswith("--output") for argument in arguments):
        arguments.append(f"--output={tmp_path / 'out'}")

    line = error_of(capsys, arguments)

    assert line.startswith(message.replace("<DIR>", str(tmp_path)))
    assert not os.path.exists(tmp_path / "out" / "_summary.json")
    assert not os.path.exists(tmp_path / "out" / "batches")


def test_a_fifo_named_like_an_archive_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "RC_2020-01.zst")

    process = run_cli(
        [f"--input={tmp_path}/*.zst", f"--output={tmp_path / 'out'}"], timeout=120
    )

    assert process.returncode == 2
    assert (
        process.stderr.strip().splitlines()[-1]
        == f"error: --input '{tmp_path}/RC_2020-01.zst' is not a regular file"
    )


def test_an_unreadable_archive_is_refused():
    # Mode bits do not bind root, which the tests may run as: the check then
    # runs in a process that gives up root once Python has started, on a
    # file in a folder every user may enter.
    folder = tempfile.mkdtemp(prefix="pushshift-unreadable-")
    try:
        os.chmod(folder, 0o777)
        locked = os.path.join(folder, "RC_locked.zst")
        with open(locked, "wb"):
            pass
        os.chmod(locked, 0o000)
        drop = (
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)"
            if os.geteuid() == 0
            else "pass"
        )
        script = (
            "import os, sys\n"
            "from beam_pipeline.cli import main\n"
            f"{drop}\n"
            f"sys.exit(main(['--input={locked}', '--output={folder}/out']))\n"
        )

        process = subprocess.run(
            [sys.executable, "-c", script],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, NO_GCE_CHECK="true"),
        )
    finally:
        shutil.rmtree(folder)

    assert process.returncode == 2, process.stderr
    assert (
        process.stderr.strip().splitlines()[-1]
        == f"error: --input '{locked}' cannot be read: permission denied"
    )
