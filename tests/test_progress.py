"""Progress: recent rates and ETAs, worker reports, the launcher's display."""

from __future__ import annotations

import logging
import os
import pty
import re
import shutil
import time

import apache_beam as beam
import pytest
import zstandard
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline.display import ProgressDisplay
from beam_pipeline.synth import SynthSpec, record_lines
from runners import runner_for
from tests.helpers import run_cli
from transforms import progress
from transforms.progress import RateWindow, format_eta
from transforms.reader import ArchiveSpec, ReadArchiveBlocks, ReaderConfig

UNIT_BYTES = 20_000_000
REPEATS = 15


@pytest.fixture(scope="module")
def realistic_archives(tmp_path_factory):
    """Three 300 MB archives that compress about 4:1 as they are read.

    A 4 MiB window cannot reach back to the previous copy of the 20 MB
    unit, so compressed bytes are consumed in step with the output and the
    percent read moves smoothly, as on the dumps.
    """
    folder = tmp_path_factory.mktemp("realistic")
    unit = b"".join(record_lines(SynthSpec(target_bytes=UNIT_BYTES, month="2019-10")))
    params = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=22, write_checksum=1, write_content_size=0, threads=-1
    )
    first = str(folder / "RC_2019-10.zst")
    with open(first, "wb") as handle:
        compressor = zstandard.ZstdCompressor(compression_params=params)
        with compressor.stream_writer(handle, closefd=False) as writer:
            for _ in range(REPEATS):
                writer.write(unit)
    paths = [first]
    for month in ("2019-11", "2019-12"):
        paths.append(str(folder / f"RC_{month}.zst"))
        shutil.copyfile(first, paths[-1])
    return paths, unit


def test_rate_and_eta_come_from_the_recent_window():
    window = RateWindow(window_secs=10.0)
    window.add(0.0, 0)
    window.add(1.0, 100)
    # Two samples, one second: not enough to say.
    assert window.rate() is None
    assert window.eta(1000) is None
    window.add(2.0, 200)
    assert window.rate() == 100.0
    assert window.eta(1000) == 10.0
    # Ten seconds later the speed has doubled; the old samples drop out.
    for second in range(3, 16):
        window.add(float(second), 200 + 200 * (second - 2))
    assert window.rate() == 200.0
    assert window.eta(1000) == 5.0
    assert window.eta(0) == 0.0


def test_time_before_work_starts_and_stalls_give_no_rate():
    window = RateWindow(window_secs=10.0)
    for second in range(6):
        window.add(float(second), 0)
    # Waiting is no part of the rate once work moves.
    window.add(6.0, 50)
    window.add(7.0, 100)
    window.add(8.0, 150)
    assert window.rate() == 50.0
    # Nothing moves for longer than the window: no ETA rather than a wrong one.
    for second in range(9, 25):
        window.add(float(second), 150)
    assert window.eta(100) is None


def test_format_eta():
    assert format_eta(None) == "ETA --"
    assert format_eta(7.4) == "ETA 7s"
    assert format_eta(185) == "ETA 3m05s"
    assert format_eta(3 * 3600 + 125) == "ETA 3h02m"


def _report(folder: str, pid: int, archive: dict) -> None:
    entry = {
        "name": "RC_2019-10.zst",
        "size": 1000,
        "compressed": 0,
        "decompressed": 0,
        "lines": 0,
        "position": 0,
        "active": 0,
        "passes_done": 0,
        "whole": True,
        "waiting": False,
        **archive,
    }
    decoders = [{"archive": entry["name"], "bytes": 2**30}] if entry["active"] else []
    progress.write_progress_file(
        folder,
        {
            "pid": pid,
            "time": time.time(),
            "rss": 0,
            "available": 0,
            "decoders": decoders,
            "archives": [entry],
        },
    )


def test_display_states_follow_the_worker_reports(tmp_path):
    folder = str(tmp_path / "_progress")
    os.makedirs(folder)
    display = ProgressDisplay(
        folder, {"RC_2019-10.zst": 1000, "RC_2019-11.zst": 500}, 1.0
    )

    assert display.lines()[1:] == [
        "  RC_2019-10.zst: queued   0.0%, 0 records, 0.0 MB decompressed",
        "  RC_2019-11.zst: queued   0.0%, 0 records, 0.0 MB decompressed",
    ]
    _report(folder, 1, {"waiting": True})
    assert display.lines()[1:] == [
        "  RC_2019-10.zst: waiting for memory   0.0%, 0 records, 0.0 MB decompressed"
    ]
    _report(
        folder,
        1,
        {"active": 1, "compressed": 500, "decompressed": 5_000_000, "lines": 9},
    )
    [overall, row] = display.lines()
    assert overall.startswith(
        "progress  33.3% of 2 archive(s) (1 queued, 1 reading): 9 records, 5 MB"
    )
    assert "decoders 1,024 MiB" in overall
    assert row == (
        "  RC_2019-10.zst: reading  50.0%, -- records/s, -- MB/s, ETA --, decoder 1,024 MiB"
    )
    _report(
        folder,
        1,
        {"compressed": 1000, "decompressed": 9_000_000, "lines": 20, "passes_done": 1},
    )
    final = display.lines(final=True)
    assert final[0].startswith(
        "progress  66.7% of 2 archive(s) (1 done, 1 not read): 20 records, 9 MB"
    )
    assert "finished" in final[0]
    assert final[1:] == [
        "  RC_2019-10.zst: done 100.0%, 20 records, 9.0 MB decompressed",
        "  RC_2019-11.zst: not read   0.0%, 0 records, 0.0 MB decompressed",
    ]


def test_display_draws_in_place_on_a_terminal(tmp_path):
    folder = str(tmp_path / "_progress")
    os.makedirs(folder)
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        display = ProgressDisplay(
            folder, {"RC_2019-10.zst": 1000}, 0.2, stream=terminal
        )
        # Reports of an earlier run are cleared when the display starts.
        _report(folder, 1, {"active": 1, "compressed": 100})
        display.start()
        _report(folder, 1, {"active": 1, "compressed": 250})
        time.sleep(0.7)
        display.stop()
    drawn = os.read(leader, 65536).decode("utf-8", errors="replace")
    os.close(leader)
    assert "\x1b[" in drawn
    assert "RC_2019-10.zst: reading  25.0%" in drawn
    assert display.last_lines[0].startswith("progress  25.0% of 1 archive(s)")


def test_a_local_run_logs_live_progress_without_control_characters(
    realistic_archives, tmp_path
):
    paths, unit = realistic_archives
    records = unit.count(b"\n") * REPEATS
    output = str(tmp_path / "out")
    completed = run_cli(
        [
            *(f"--input={path}" for path in paths),
            f"--output={output}",
            "--subreddit=AskMen",
            # Parsing every line keeps the run long enough for an ETA.
            "--parse_all_lines",
            "--progress_interval_secs=0.5",
        ],
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    log = completed.stderr
    assert "\x1b" not in log and "\r" not in log
    overall = [
        line
        for line in log.splitlines()
        if "beam_pipeline.progress: progress " in line and "of 3 archive(s)" in line
    ]
    percents = [
        float(re.search(r"progress +([\d.]+)%", line).group(1)) for line in overall
    ]
    assert len(set(percents)) >= 4, overall
    assert percents == sorted(percents)
    assert 0.0 < min(p for p in percents if p > 0) < 50.0
    assert percents[-1] == 100.0
    # An ETA appears once there is enough history, and no line has a
    # negative or absurd one.
    etas = [re.search(r"ETA (\d+)s;", line) for line in overall]
    assert any(etas), overall
    assert all(int(match.group(1)) < 60 for match in etas if match)
    assert "finished" in overall[-1]
    rows = [line.split("beam_pipeline.progress: ")[1] for line in log.splitlines()]
    reading = [row for row in rows if re.match(r"  RC_2019-1\d\.zst: reading ", row)]
    assert reading, rows
    assert all(
        re.search(r"[\d,]+ records/s, [\d.]+ MB/s|-- records/s", row) for row in reading
    )
    megabytes = REPEATS * len(unit) / 1e6
    assert rows[-3:] == [
        f"  RC_2019-1{month}.zst: done 100.0%, {records:,} records,"
        f" {megabytes:,.1f} MB decompressed"
        for month in (0, 1, 2)
    ]


def test_workers_without_a_progress_folder_log_their_figures_at_info(
    realistic_archives, caplog
):
    path = realistic_archives[0][0]
    spec = ArchiveSpec(0, path, os.path.getsize(path))
    config = ReaderConfig(progress_dir="", progress_interval_secs=0.3)
    options = PipelineOptions([])
    pipeline = beam.Pipeline(runner=runner_for(options), options=options)
    _ = (
        pipeline
        | beam.Create([spec])
        | beam.ParDo(ReadArchiveBlocks(config, {0: spec.name}))
        # A slow consumer keeps the archive being read for several reporting
        # periods, however fast or loaded the machine is.
        | beam.Map(lambda block: time.sleep(0.01) or len(block.data))
    )

    with caplog.at_level(logging.INFO, logger="transforms.progress"):
        pipeline.run().wait_until_finish()
        # The reporter logs on its own schedule: give it one more period.
        time.sleep(0.7)

    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "transforms.progress" and record.levelno == logging.INFO
    ]
    reading = [
        line
        for line in lines
        if line.startswith("progress RC_2019-10.zst (reading): at ")
    ]
    assert reading, lines
    assert all(
        re.search(
            r"% of [\d,.]+ MB compressed, [\d,]+ records and [\d,.]+ MB decompressed",
            line,
        )
        for line in reading
    )
    assert all(
        "; worker RSS " in line and "machine available" in line for line in reading
    )
    assert any(
        line.startswith("progress RC_2019-10.zst (done here): at 100.0% of")
        for line in lines
    ), lines
