"""The main job end to end on real and synthetic archives."""

from __future__ import annotations

import json
import os
import re

import pytest

from beam_pipeline.options import OptionError, parse_time
from tests.helpers import (
    archive_lines,
    dead_letters,
    parse,
    read_batches,
    real_sample,
    run,
    run_cli,
    summary,
    written_records,
)
from transforms.records import parse_created_utc
from transforms.sinks import BatchHandler, WriteBatchFiles, batch_file_name

RC_FILES = ["RC_2005-12.zst", "RC_2006-01.zst"]


def expected_records(paths, keep):
    """Lines of the archives that ``keep`` accepts, parsed without the job."""
    result = []
    for path in paths:
        for _, line in archive_lines(path):
            record = json.loads(line)
            if keep(record):
                result.append(line)
    return result


def test_reddit_com_from_both_rc_files_in_batches_of_100(real_data, tmp_path):
    inputs = [real_sample(name) for name in RC_FILES]
    output = str(tmp_path / "out")

    result = run(
        [
            *(f"--input={path}" for path in inputs),
            f"--output={output}",
            "--subreddit=reddit.com",
            "--batch_size=100",
        ]
    )

    expected = expected_records(
        inputs, lambda r: r.get("subreddit", "").lower() == "reddit.com"
    )
    assert len(expected) == 4739
    written = written_records(output)
    assert sorted(written) == sorted(expected)
    assert len(set(written)) == len(written)

    sizes = sorted(len(lines) for lines in read_batches(output).values())
    # One key, so every batch is full except the last.
    assert sizes.count(100) == len(sizes) - 1
    assert sizes[0] == len(expected) % 100
    assert result["records_read"] == 1075 + 3666
    assert result["records_matched"] == result["records_written"] == 4739
    assert result["batches_written"] == len(sizes)
    assert result["status"] == "succeeded"


def test_records_are_written_byte_for_byte(real_data, tmp_path):
    path = real_sample("AskWomen_submissions_2019-10.zst")
    output = str(tmp_path / "out")

    run([f"--input={path}", f"--output={output}", "--batch_size=500"])

    original = [line for _, line in archive_lines(path)]
    assert sorted(written_records(output)) == sorted(original)


def test_batches_hold_one_key_each_and_at_most_batch_size(real_data, tmp_path):
    path = real_sample("RC_2006-01.zst")
    output = str(tmp_path / "out")

    run([f"--input={path}", f"--output={output}", "--batch_size=7"])

    per_key: dict[str, list[int]] = {}
    for lines in read_batches(output).values():
        keys = {parse(line)["subreddit"].lower() for line in lines}
        assert len(keys) == 1
        per_key.setdefault(keys.pop(), []).append(len(lines))
    for key, sizes in per_key.items():
        assert all(size <= 7 for size in sizes), key
        assert sum(size < 7 for size in sizes) <= 1, (key, sizes)


def test_batch_key_author_and_none(real_data, tmp_path):
    path = real_sample("RC_2005-12.zst")

    run(
        [
            f"--input={path}",
            f"--output={tmp_path / 'a'}",
            "--batch_key=author",
            "--batch_size=50",
        ]
    )
    for lines in read_batches(str(tmp_path / "a")).values():
        assert len({parse(line)["author"].lower() for line in lines}) == 1

    run(
        [
            f"--input={path}",
            f"--output={tmp_path / 'n'}",
            "--batch_key=none",
            "--num_shards=4",
            "--batch_size=100",
        ]
    )
    batches = read_batches(str(tmp_path / "n"))
    sizes = sorted(len(lines) for lines in batches.values())
    assert sum(sizes) == 1075
    assert sum(size < 100 for size in sizes) <= 4
    assert all(name.startswith("shard_") for name in batches)


def test_filters_combine_subreddit_author_and_time(real_data, tmp_path):
    path = real_sample("RC_2006-01.zst")
    since, until = "2006-01-10", "2006-01-20T12:00:00"
    low, high = parse_time(since, "--since"), parse_time(until, "--until")
    records = [parse(line) for _, line in archive_lines(path)]
    author = next(r["author"] for r in records if r["author"].startswith("user_"))

    def keep(record):
        created = parse_created_utc(record.get("created_utc"))
        return (
            record.get("subreddit", "").lower() == "reddit.com"
            and created is not None
            and low <= created < high
        )

    output = str(tmp_path / "time")
    run(
        [
            f"--input={path}",
            f"--output={output}",
            "--subreddit=REDDIT.com",
            f"--since={since}",
            f"--until={until}",
        ]
    )
    assert sorted(written_records(output)) == sorted(expected_records([path], keep))
    assert 0 < len(written_records(output)) < 3666

    output = str(tmp_path / "author")
    run([f"--input={path}", f"--output={output}", f"--author={author.upper()}"])
    expected = expected_records(
        [path], lambda r: r.get("author", "").lower() == author.lower()
    )
    assert sorted(written_records(output)) == sorted(expected)
    assert expected


def test_names_may_be_given_comma_separated(real_data, tmp_path):
    path = real_sample("RC_2006-01.zst")
    records = [parse(line) for _, line in archive_lines(path)]
    authors = sorted({r["author"] for r in records if r["author"].startswith("user_")})[
        :3
    ]

    run(
        [
            f"--input={path}",
            f"--output={tmp_path / 'one'}",
            f"--author={','.join(authors)}",
        ]
    )
    run(
        [f"--input={path}", f"--output={tmp_path / 'many'}"]
        + [f"--author={author}" for author in authors]
    )

    expected = expected_records([path], lambda r: r.get("author") in set(authors))
    assert sorted(written_records(str(tmp_path / "one"))) == sorted(expected)
    assert sorted(written_records(str(tmp_path / "many"))) == sorted(expected)
    assert len(expected) >= 3


def test_fields_keeps_only_the_named_fields(real_data, tmp_path):
    path = real_sample("RC_2005-12.zst")
    output = str(tmp_path / "out")

    run(
        [
            f"--input={path}",
            f"--output={output}",
            "--fields=id,subreddit",
            "--fields=created_utc,nope",
        ]
    )

    written = [parse(line) for line in written_records(output)]
    original = [parse(line) for _, line in archive_lines(path)]
    assert len(written) == len(original)
    expected = sorted(
        (
            {k: r[k] for k in ("id", "subreddit", "created_utc") if k in r}
            for r in original
        ),
        key=lambda r: r["id"],
    )
    assert sorted(written, key=lambda r: r["id"]) == expected


def test_created_utc_of_every_type_filters_alike(synthetic_archives, tmp_path):
    # The same seed in three layouts: string, int and float created_utc.
    outputs = {}
    for month in ("2010-06", "2019-06", "2024-06"):
        path = synthetic_archives(f"RC_{month}.zst", records=3000, month=month, seed=7)
        sample = parse(archive_lines(path)[0][1])["created_utc"]
        assert (
            type(sample).__name__
            == {"2010-06": "str", "2019-06": "int", "2024-06": "float"}[month]
        )
        output = str(tmp_path / month)
        run(
            [
                f"--input={path}",
                f"--output={output}",
                f"--since={month}-10",
                f"--until={month}-20",
            ]
        )
        outputs[month] = len(written_records(output))
    assert len(set(outputs.values())) == 1, outputs
    assert 0 < outputs["2019-06"] < 3000


def test_plain_ndjson_with_a_last_line_without_newline(real_data, tmp_path):
    path = real_sample("comments_2024-02_sample.ndjson")
    output = str(tmp_path / "out")

    result = run([f"--input={path}", f"--output={output}"])

    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    assert lines[-1]  # the sample's last line has no newline
    assert sorted(written_records(output)) == sorted(line for line in lines if line)
    assert result["records_read"] == 27


def test_bad_lines_go_to_dead_letters_with_offset_and_reason(tmp_path):
    good = b'{"subreddit":"a","author":"x","created_utc":1}'
    content = b"\n".join([good, b"not json", b"[1,2]", good, b'{"cut": '])
    path = tmp_path / "RS_bad.ndjson"
    path.write_bytes(content)
    output = str(tmp_path / "out")

    result = run([f"--input={path}", f"--output={output}"])

    letters = dead_letters(output)
    assert [(letter["offset"], letter["line"]) for letter in letters] == [
        (len(good) + 1, "not json"),
        (len(good) + 10, "[1,2]"),
        (2 * len(good) + 17, '{"cut": '),
    ]
    assert letters[0]["archive"] == "RS_bad.ndjson"
    assert letters[0]["reason"].startswith("not valid JSON")
    assert letters[1]["reason"] == "JSON array, not an object"
    assert written_records(output) == [good, good]
    assert result["dead_letters"] == 3
    assert result["records_read"] == 2


def test_summary_file_holds_the_counters(real_data, tmp_path):
    path = real_sample("RC_2005-12.zst")
    output = str(tmp_path / "out")

    returned = run([f"--input={path}", f"--output={output}", "--subreddit=reddit.com"])

    saved = summary(output)
    for name in (
        "records_read",
        "records_matched",
        "records_written",
        "batches_written",
        "dead_letters",
        "compressed_bytes_read",
        "decompressed_bytes_read",
        "peak_rss_bytes",
    ):
        assert saved[name] == returned[name], name
    assert saved["compressed_bytes_read"] == os.path.getsize(path)
    assert (
        saved["decompressed_bytes_read"]
        == len(b"\n".join(line for _, line in archive_lines(path))) + 1
    )
    assert saved["peak_rss_bytes"] > 50 * 2**20


def test_cli_prints_the_summary_and_exits_zero(real_data, tmp_path):
    process = run_cli(
        [f"--input={real_sample('RC_2005-12.zst')}", f"--output={tmp_path / 'out'}"]
    )

    assert process.returncode == 0, process.stderr
    assert "status: succeeded" in process.stdout
    assert "records read 1,075" in process.stdout


def test_help_lists_every_job_option():
    process = run_cli(["--help"], timeout=120)

    assert process.returncode == 0
    for flag in (
        "--input",
        "--output",
        "--batch_size",
        "--batch_max_buffering_secs",
        "--batch_key",
        "--subreddit",
        "--author",
        "--since",
        "--until",
        "--fields",
        "--max_memory_mb",
        "--profile",
    ):
        assert flag in process.stdout, flag


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--output=OUT"], "error: --input is required"),
        (
            ["--input=/nonexistent/RC_*.zst", "--output=OUT"],
            "error: --input '/nonexistent/RC_*.zst' matches no file",
        ),
        (
            ["--input=IN", "--output=OUT", "--batch_size=0"],
            "error: --batch_size must be at least 1, not 0",
        ),
        (
            ["--input=IN", "--output=OUT", "--since=2020-01-02", "--until=2020-01-01"],
            "error: --since 2020-01-02 is not before --until 2020-01-01",
        ),
        (
            ["--input=IN", "--output=OUT", "--since=yesterday"],
            "error: --since 'yesterday' is neither an ISO date",
        ),
        (
            ["--input=IN", "--output=OUT", "--batch_key=month"],
            "error: --batch_key must be one of subreddit, author, none",
        ),
        (
            ["--input=IN", "--output=OUT", "--batch_handler=nosuch:Cls"],
            "error: --batch_handler 'nosuch:Cls' cannot be loaded: No module named 'nosuch'",
        ),
        (
            ["--input=IN", "--output=OUT", "--batch_handler=json:dumps"],
            "error: --batch_handler 'json:dumps' is not a subclass of transforms.sinks.BatchHandler",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(real_data, tmp_path, arguments, message):
    arguments = [
        a.replace("IN", real_sample("RC_2005-12.zst")).replace(
            "OUT", str(tmp_path / "out")
        )
        for a in arguments
    ]

    process = run_cli(arguments, timeout=120)

    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(message), process.stderr
    assert "Traceback" not in process.stderr


def test_options_error_names_the_flag():
    with pytest.raises(OptionError, match="--until"):
        parse_time("not a time", "--until")


class JsonListHandler(BatchHandler):
    """A handler of the kind a user plugs in: one JSON list per batch."""

    def hand_on(self, batch_id, key, records):
        folder = os.path.join(self._output, "handed")
        os.makedirs(folder, exist_ok=True)
        with open(
            os.path.join(folder, batch_id + ".json"), "w", encoding="utf-8"
        ) as handle:
            json.dump(
                {"key": key, "records": [line.decode("utf-8") for _, line in records]},
                handle,
            )


class RefusingHandler(BatchHandler):
    """A handler whose destination is down."""

    def hand_on(self, batch_id, key, records):
        raise ConnectionError(f"the destination refused batch {batch_id}")


def test_a_failing_step_ends_the_job_with_one_line_naming_the_cause(
    real_data, tmp_path
):
    process = run_cli(
        [
            f"--input={real_sample('RC_2005-12.zst')}",
            f"--output={tmp_path / 'out'}",
            "--batch_handler=tests.test_main_job:RefusingHandler",
        ]
    )

    assert process.returncode == 1
    last = process.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: the job failed: ConnectionError: the destination refused batch"
        r" \S+\.jsonl\.zst \[while running '[^']+'\]; the batches it wrote are"
        r" kept, and the same command resumes the job once the cause is fixed",
        last,
    ), last
    assert not (tmp_path / "out" / "_summary.json").exists()


def test_a_custom_batch_handler_receives_every_batch(real_data, tmp_path):
    path = real_sample("RC_2005-12.zst")
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={path}",
            f"--output={output}",
            "--batch_size=100",
            "--batch_handler=tests.test_main_job:JsonListHandler",
        ]
    )

    handed = []
    for name in os.listdir(os.path.join(output, "handed")):
        with open(os.path.join(output, "handed", name), encoding="utf-8") as handle:
            batch = json.load(handle)
        assert len(batch["records"]) <= 100
        assert {
            parse(line.encode())["subreddit"].lower() for line in batch["records"]
        } == {batch["key"]}
        handed.extend(line.encode() for line in batch["records"])
    assert sorted(handed) == sorted(line for _, line in archive_lines(path))
    assert result["records_written"] == 1075
    assert not os.path.exists(os.path.join(output, "batches"))


def test_a_batch_the_writer_thread_cannot_write_fails_its_bundle(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    # Temporary files go under _tmp, here a file where a folder must be.
    (output / "_tmp").write_bytes(b"")
    handler = WriteBatchFiles(str(output))
    handler.setup()

    assert list(handler.process(("k", [(7, b"{}")]))) == [batch_file_name("k", 7)]
    with pytest.raises(OSError, match="_tmp"):
        handler.finish_bundle()
    handler.teardown()
    assert not (output / "batches").exists()


def test_batches_are_written_before_the_bundle_ends(tmp_path):
    output = tmp_path / "out"
    handler = WriteBatchFiles(str(output))
    handler.max_pending_bytes = 1
    handler.setup()

    for position in range(5):
        list(handler.process(("k", [(position * 10, b'{"n":%d}' % position)])))
    handler.finish_bundle()
    handler.teardown()

    assert sorted(read_batches(str(output)).values()) == [
        [b'{"n":%d}' % position] for position in range(5)
    ]


def test_both_leftover_groupings_write_the_same_batches(real_data, tmp_path):
    path = real_sample("RC_2006-01.zst")
    outputs = {}
    for grouping in ("group_into_batches", "group_by_key"):
        output = str(tmp_path / grouping)
        run(
            [
                f"--input={path}",
                f"--output={output}",
                "--batch_size=7",
                f"--leftover_grouping={grouping}",
            ]
        )
        outputs[grouping] = read_batches(output)

    assert outputs["group_into_batches"].keys() == outputs["group_by_key"].keys()
    for name, lines in outputs["group_into_batches"].items():
        assert sorted(lines) == sorted(outputs["group_by_key"][name]), name
