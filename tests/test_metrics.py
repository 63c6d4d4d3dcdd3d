"""Beam metrics of a run equal figures computed from the archives without the job."""

from __future__ import annotations

import collections
import os

import apache_beam as beam
import orjson
import zstandard
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline.cli import prepare
from beam_pipeline.pipeline import build_pipeline
from beam_pipeline.synth import SynthSpec, record_lines
from runners import runner_for
from tests.helpers import (
    archive_lines,
    batch_files,
    dead_letters,
    decompress_file,
    read_batches,
    real_sample,
    run,
    written_records,
)
from transforms.metrics import NAMESPACE, split_archive_metric

REAL = ["RC_2005-12.zst", "RC_2006-01.zst", "AskWomen_submissions_2019-10.zst"]


class Figures:
    """A run's metrics in the job's namespace, summed over steps."""

    def __init__(self, result) -> None:
        queried = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
        self.counters: dict[str, int] = collections.Counter()
        self.per_archive: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for counter in queried["counters"]:
            name = counter.key.metric.name
            value = counter.committed
            split = split_archive_metric(name)
            if split is None:
                self.counters[name] += value
            else:
                kind, archive = split
                self.per_archive[archive][kind] = (
                    self.per_archive[archive].get(kind, 0) + value
                )
        self.distributions: dict[str, tuple[int, int, int, int]] = {}
        for distribution in queried["distributions"]:
            data = distribution.committed
            name = distribution.key.metric.name
            count, total, low, high = self.distributions.get(
                name, (0, 0, data.min, data.max)
            )
            self.distributions[name] = (
                count + data.count,
                total + data.sum,
                min(low, data.min),
                max(high, data.max),
            )
        self.gauges = {
            gauge.key.metric.name: gauge.committed.value for gauge in queried["gauges"]
        }


def run_pipeline(arguments: list[str]) -> Figures:
    """Builds and runs the job's pipeline; returns the PipelineResult's metrics."""
    options = PipelineOptions(arguments)
    plan = prepare(options)
    pipeline = beam.Pipeline(runner=runner_for(options), options=options)
    build_pipeline(pipeline, plan)
    result = pipeline.run()
    result.wait_until_finish()
    return Figures(result)


def distribution_of(values: list[int]) -> tuple[int, int, int, int]:
    return len(values), sum(values), min(values), max(values)


def test_counters_and_distributions_on_real_archives(real_data, tmp_path):
    paths = [real_sample(name) for name in REAL]
    output = str(tmp_path / "out")

    figures = run_pipeline(
        [
            *(f"--input={path}" for path in paths),
            f"--output={output}",
            "--subreddit=reddit.com",
            "--batch_size=100",
        ]
    )

    lines = {os.path.basename(path): archive_lines(path) for path in paths}
    matched = {
        name: [
            line
            for _, line in found
            if orjson.loads(line).get("subreddit") == "reddit.com"
        ]
        for name, found in lines.items()
    }
    everything_matched = [line for found in matched.values() for line in found]
    assert [len(found) for found in lines.values()] == [1075, 3666, 8271]
    assert len(everything_matched) == 4739
    batches = read_batches(output)

    assert figures.counters["records_read"] == 1075 + 3666 + 8271
    assert figures.counters["records_matched"] == 4739
    assert figures.counters["records_written"] == 4739
    assert figures.counters["batches_written"] == len(batch_files(output)) == 48
    assert figures.counters["dead_letters"] == 0
    assert figures.counters["blank_lines"] == 0
    assert figures.counters["compressed_bytes_read"] == sum(map(os.path.getsize, paths))
    assert figures.counters["decompressed_bytes_read"] == sum(
        len(decompress_file(path)) for path in paths
    )
    assert figures.counters["memory_deferrals"] == 0

    assert dict(figures.per_archive) == {
        os.path.basename(path): {
            "records_read": len(lines[os.path.basename(path)]),
            "records_matched": len(matched[os.path.basename(path)]),
            "compressed_bytes_read": os.path.getsize(path),
            "decompressed_bytes_read": len(decompress_file(path)),
        }
        for path in paths
    }

    assert figures.distributions["batch_records"] == distribution_of(
        [len(batch) for batch in batches.values()]
    )
    assert figures.distributions["record_bytes"] == distribution_of(
        [len(line) for line in written_records(output)]
    )
    assert figures.distributions["record_bytes"][1] == sum(map(len, everything_matched))
    # Memory is sampled once a pass starts reading, then every half second.
    count, _, low, high = figures.distributions["worker_rss_bytes"]
    assert count >= len(paths) and 0 < low <= high
    assert figures.gauges["decoder_window_bytes_open"] == 0
    assert figures.gauges["worker_rss_bytes_now"] > 0
    assert figures.gauges["machine_available_bytes"] > 0


def _dump_like(path: str, lines: list[bytes]) -> None:
    """Compresses lines as the dumps are: one frame, 2 GiB window, no size."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=31, enable_ldm=True, write_checksum=1, write_content_size=0
    )
    with open(path, "wb") as handle:
        writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(
            handle
        )
        with writer:
            writer.write(b"".join(lines))


def test_dead_letters_and_blank_lines_are_counted_on_synthetic_input(tmp_path):
    lines = list(
        record_lines(SynthSpec(target_bytes=2_000_000, month="2016-05", seed=3))
    )
    # Two lines that are no records, and a blank one, among the records.
    lines[10:10] = [b"not json at all\n", b"[1, 2, 3]\n", b"\n"]
    path = str(tmp_path / "RC_2016-05.zst")
    _dump_like(path, lines)
    output = str(tmp_path / "out")

    figures = run_pipeline(
        [f"--input={path}", f"--output={output}", "--batch_size=500"]
    )

    records = len(lines) - 3
    assert figures.counters["records_read"] == records
    assert figures.counters["records_matched"] == records
    assert (
        figures.counters["records_written"] == records == len(written_records(output))
    )
    assert figures.counters["dead_letters"] == 2 == len(dead_letters(output))
    assert figures.counters["blank_lines"] == 1
    assert figures.counters["compressed_bytes_read"] == os.path.getsize(path)
    assert figures.counters["decompressed_bytes_read"] == sum(map(len, lines))
    assert figures.per_archive["RC_2016-05.zst"]["records_read"] == records
    assert figures.distributions["record_bytes"] == distribution_of(
        [len(line) - 1 for line in lines if line.startswith(b"{")]
    )
    assert figures.distributions["batch_records"][:2] == (
        len(batch_files(output)),
        records,
    )


def test_summary_reports_per_archive_counts_and_their_distribution(
    tmp_path, synthetic_archives
):
    # One archive read in several restrictions, one in a single pass.
    split = synthetic_archives(
        "RS_2019-03.zst", frame_bytes=2**20, target_bytes=6 * 10**6, kind="submissions"
    )
    whole = synthetic_archives(
        "RC_2019-04.zst", target_bytes=3 * 10**6, month="2019-04"
    )
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={split}",
            f"--input={whole}",
            f"--output={output}",
            "--desired_split_bytes=2000000",
        ]
    )

    counts = {
        os.path.basename(path): len(archive_lines(path)) for path in (split, whole)
    }
    archives = {entry["name"]: entry for entry in result["archives"]}
    assert {name: archives[name]["records_read"] for name in counts} == counts
    assert {name: archives[name]["records_matched"] for name in counts} == counts
    assert archives["RC_2019-04.zst"]["compressed_bytes_read"] == os.path.getsize(whole)
    assert archives["RC_2019-04.zst"]["decompressed_bytes_read"] == len(
        decompress_file(whole)
    )
    assert result["distributions"]["archive_records_read"] == {
        "count": 2,
        "sum": sum(counts.values()),
        "min": min(counts.values()),
        "max": max(counts.values()),
    }
    assert result["records_read"] == sum(counts.values())
    assert result["gauges"]["decoder_window_bytes_open"] == 0
    assert result["peak_job_rss_bytes"] > 0
