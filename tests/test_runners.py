"""The same job on every runner, and how each splits and checkpoints a read.

Each runner runs one job on the real RC samples and a seekable multi-frame
synthetic archive (split initially by ``--desired_split_bytes``); every run
must write exactly the records found without the job, in the same batch
sizes. A second, instrumented pipeline per runner records how the reader's
restrictions are split and checkpointed there.

A runner that cannot run here fails as expected (xfail) with the reason;
none is skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import (
    DebugOptions,
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    PrismRunnerOptions,
)
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration

from beam_pipeline.options import OptionError
from runners import flink, prism, runner_for
from runners.tools import PROJECT_ROOT
from tests.helpers import archive_lines, parse, read_batches, real_sample, run, summary
from transforms.reader import (
    ArchiveSpec,
    ReadArchiveBlocks,
    ReaderConfig,
    archive_index,
)
from transforms.restriction import END_OF_ARCHIVE, ArchiveTracker

pytestmark = pytest.mark.runners

RC_FILES = ("RC_2005-12.zst", "RC_2006-01.zst")
MIB = 2**20
BATCH_SIZE = 100
SPLIT_BYTES = 4 * MIB

RUNNER_FLAGS = {
    "direct": [],
    "direct-multi-processing": [
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    ],
    "prism": ["--runner=PrismRunner"],
    "flink": ["--runner=FlinkRunner", "--flink_master=[local]"],
}

# The instrumented read runs Prism with its own splitting left on, to record
# what Prism does; the job itself runs with runner_for's defaults.
PROBE_FLAGS = dict(
    RUNNER_FLAGS, prism=["--runner=PrismRunner", f"--experiments={prism.KEEP_SPLITS}"]
)

RUNNER_NAMES = {
    "direct": "DirectRunner",
    "direct-multi-processing": "DirectRunner",
    "prism": "PrismRunner",
    "flink": "FlinkRunner",
}

# What each runner does with a running restriction, as measured below.
ISSUES_DYNAMIC_SPLITS = {
    "direct": False,
    "direct-multi-processing": False,
    "prism": True,
    "flink": False,
}


def _flink_blocker() -> str | None:
    """Why Flink cannot run here, or None when its job server jar is there."""
    try:
        flink.prepare(PipelineOptions(["--runner=FlinkRunner"]))
    except OptionError as exc:
        reason = str(exc)
    else:
        return None
    log = (os.environ.get(flink.ENV_VAR) or flink.DEFAULT_JAR) + ".log"
    if os.path.isfile(log):
        with open(log, encoding="utf-8", errors="replace") as handle:
            answer = handle.read()
        if re.search(r"not found|Could not find artifact", answer):
            reason += (
                f"; `make` tried to fetch {flink.JOB_SERVER_ARTIFACT} and Maven answered"
                " that the registry reachable here does not serve it"
            )
    return f"the Flink job server is not available: {reason}"


def _require(runner: str) -> None:
    """Fails (Prism) or xfails (Flink) when a runner's tool is missing here."""
    if runner == "prism":
        try:
            prism.prepare(PipelineOptions(["--runner=PrismRunner"]))
        except OptionError as exc:
            pytest.fail(f"Prism cannot run: {exc}")
    elif runner == "flink":
        blocker = _flink_blocker()
        if blocker is not None:
            pytest.xfail(blocker)


@pytest.fixture(scope="module", autouse=True)
def _workers_import_the_tests():
    # Worker processes unpickle the instrumented DoFns below by module name,
    # whatever folder the tests were started from.
    path = os.environ.get("PYTHONPATH")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", PROJECT_ROOT + (os.pathsep + path if path else ""))
        yield


@pytest.fixture(scope="module")
def seekable_archive(synthetic_archives) -> str:
    """A 16 MB seekable archive of 1 MiB frames: splittable at frame boundaries."""
    return synthetic_archives(
        "seekable_RC_2019-10.zst",
        frame_bytes=MIB,
        kind="comments",
        month="2019-10",
        target_bytes=16 * 10**6,
    )


def _reddit_com(paths) -> list[bytes]:
    return [
        line
        for path in paths
        for _, line in archive_lines(path)
        if parse(line).get("subreddit", "").lower() == "reddit.com"
    ]


@pytest.fixture(scope="module", params=list(RUNNER_FLAGS))
def job_run(request, real_data, seekable_archive, tmp_path_factory):
    """One run of the job per runner: (runner, inputs, output, summary)."""
    runner = request.param
    _require(runner)
    inputs = [real_sample(name) for name in RC_FILES] + [seekable_archive]
    output = str(tmp_path_factory.mktemp(f"job-{runner}") / "out")
    result = run(
        [
            *(f"--input={path}" for path in inputs),
            f"--output={output}",
            "--subreddit=reddit.com",
            f"--batch_size={BATCH_SIZE}",
            f"--desired_split_bytes={SPLIT_BYTES}",
            "--block_bytes=262144",
            *RUNNER_FLAGS[runner],
        ]
    )
    return runner, inputs, output, result


def _batch_sizes(output: str) -> list[int]:
    return sorted(len(lines) for lines in read_batches(output).values())


def test_every_runner_writes_the_same_records_in_the_same_batch_sizes(job_run):
    runner, inputs, output, result = job_run

    expected = _reddit_com(inputs)
    written = [line for lines in read_batches(output).values() for line in lines]
    assert len(expected) == 4739 + len(_reddit_com(inputs[2:]))
    assert sorted(written) == sorted(expected)
    # One key: every batch is full but the last.
    full, rest = divmod(len(expected), BATCH_SIZE)
    assert _batch_sizes(output) == sorted(
        [BATCH_SIZE] * full + ([rest] if rest else [])
    )
    assert result["records_read"] == 1075 + 3666 + len(archive_lines(inputs[2]))
    assert result["records_written"] == len(expected)
    assert result["status"] == summary(output)["status"] == "succeeded"
    assert result["runner"] == RUNNER_NAMES[runner]


class _Events:
    """Appends JSON events to one file per worker process."""

    def __init__(self, folder: str) -> None:
        self._folder = folder

    def add(self, **event) -> None:
        event.update(pid=os.getpid(), time=time.time())
        with open(
            os.path.join(self._folder, f"events-{os.getpid()}.jsonl"),
            "a",
            encoding="utf-8",
        ) as handle:
            handle.write(json.dumps(event) + "\n")

    @staticmethod
    def read(folder: str) -> list[dict]:
        events = []
        for name in os.listdir(folder):
            if name.startswith("events-"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    events.extend(json.loads(line) for line in handle)
        return sorted(events, key=lambda event: event["time"])


class _RecordingTracker(ArchiveTracker):
    """The reader's tracker, noting every split the runner asks of it."""

    def __init__(self, restriction, index, events: _Events) -> None:
        super().__init__(restriction, index)
        self._events = events

    def try_split(self, fraction_of_remainder):
        before = self.current_restriction()
        result = super().try_split(fraction_of_remainder)
        self._events.add(
            kind="try_split",
            fraction=fraction_of_remainder,
            start=before.start,
            stop=before.stop,
            split_at=None if result is None else result[1].start,
        )
        return result


class RecordingRead(ReadArchiveBlocks):
    """The job's reader, noting its initial splits, passes and checkpoints.

    With ``defer_once``, the first pass over each restriction checkpoints
    itself before reading, as the reader does when a decoder's memory
    cannot be reserved.
    """

    DEFER_SECS = 0.5

    def __init__(self, config, names, folder: str, defer_once: bool) -> None:
        super().__init__(config, names)
        self._folder = folder
        self._defer_once = defer_once

    def split(self, element, restriction):
        parts = list(super().split(element, restriction))
        _Events(self._folder).add(
            kind="initial_split", parts=[[p.start, p.stop] for p in parts]
        )
        return parts

    def create_tracker(self, restriction):
        index = archive_index(restriction.path, os.path.getsize(restriction.path))
        return _RecordingTracker(restriction, index, _Events(self._folder))

    def process(self, element, tracker=beam.DoFn.RestrictionParam()):
        restriction = tracker.current_restriction()
        _Events(self._folder).add(
            kind="pass", start=restriction.start, stop=restriction.stop
        )
        marker = os.path.join(self._folder, f"deferred-{restriction.start}")
        if self._defer_once and not os.path.exists(marker):
            open(marker, "w").close()
            _Events(self._folder).add(kind="checkpoint", start=restriction.start)
            tracker.defer_remainder(Duration(seconds=self.DEFER_SECS))
            return
        yield from super().process(element, tracker)


class WriteLinesSlowlyAtFirst(beam.DoFn):
    """Writes each block's (offset, line) pairs; stalls on the first block.

    The stall leaves the reader's bundle without progress for a second, the
    condition on which a runner that splits dynamically asks for a split.
    """

    def __init__(self, folder: str) -> None:
        self._folder = folder

    def process(self, block) -> None:
        if not block.data:
            # The reader's end-of-archive marker for the job state.
            return
        if block.offset == 0:
            time.sleep(1.0)
        lines = block.data.split(b"\n")
        if block.data.endswith(b"\n"):
            lines.pop()
        offset = block.offset
        path = os.path.join(self._folder, f"lines-{os.getpid()}.txt")
        with open(path, "ab") as handle:
            for line in lines:
                handle.write(b"%d\t%s\n" % (offset, line))
                offset += len(line) + 1


def _read_lines(folder: str) -> list[tuple[int, bytes]]:
    result = []
    for name in os.listdir(folder):
        if name.startswith("lines-"):
            with open(os.path.join(folder, name), "rb") as handle:
                for row in handle.read().split(b"\n")[:-1]:
                    offset, _, line = row.partition(b"\t")
                    result.append((int(offset), line))
    return sorted(result)


def _run_recorded(
    path: str, runner: str, folder: str, split_bytes: int, defer_once: bool
) -> list[dict]:
    options = PipelineOptions(list(PROBE_FLAGS[runner]))
    spec = ArchiveSpec(0, path, os.path.getsize(path))
    config = ReaderConfig(desired_split_bytes=split_bytes, block_bytes=256 * 1024)
    pipeline = beam.Pipeline(runner=runner_for(options), options=options)
    _ = (
        pipeline
        | beam.Create([spec], reshuffle=False)
        | beam.ParDo(RecordingRead(config, {0: spec.name}, folder, defer_once))
        | beam.ParDo(WriteLinesSlowlyAtFirst(folder))
    )
    pipeline.run().wait_until_finish()
    return _Events.read(folder)


@pytest.fixture(scope="module", params=list(RUNNER_FLAGS))
def recorded_read(request, seekable_archive, tmp_path_factory):
    """The instrumented read of the seekable archive, once per runner."""
    runner = request.param
    _require(runner)
    folder = str(tmp_path_factory.mktemp(f"splits-{runner}"))
    events = _run_recorded(seekable_archive, runner, folder, 8 * MIB, defer_once=True)
    return runner, folder, events


def test_every_runner_reads_each_line_once_through_splits_and_checkpoints(
    recorded_read, seekable_archive
):
    _, folder, _ = recorded_read

    assert _read_lines(folder) == archive_lines(seekable_archive)


def test_initial_splits_fall_on_frame_boundaries_on_every_runner(
    recorded_read, seekable_archive
):
    _, _, events = recorded_read
    index = archive_index(seekable_archive, os.path.getsize(seekable_archive))

    [initial] = [event["parts"] for event in events if event["kind"] == "initial_split"]
    assert initial[0][0] == 0 and initial[-1][1] == index.decompressed_size
    assert all(left[1] == right[0] for left, right in itertools.pairwise(initial))
    assert {start for start, _ in initial[1:]} <= set(index.decompressed_offsets)
    # 16 MB in 1 MiB frames, cut about every 8 MiB.
    assert len(initial) == 2


def test_every_runner_resumes_each_checkpoint_after_its_delay(recorded_read):
    runner, _, events = recorded_read

    checkpoints = [event for event in events if event["kind"] == "checkpoint"]
    assert checkpoints
    for checkpoint in checkpoints:
        later = [
            event
            for event in events
            if event["kind"] == "pass"
            and event["start"] == checkpoint["start"]
            and event["time"] > checkpoint["time"]
        ]
        assert len(later) == 1, (
            f"restriction at {checkpoint['start']} resumed {len(later)} times"
        )
        waited = later[0]["time"] - checkpoint["time"]
        if runner in ("prism", "flink"):
            assert waited >= RecordingRead.DEFER_SECS * 0.9
    # The runner takes the checkpoint as a split at the restriction's start.
    zero_splits = [
        event
        for event in events
        if event["kind"] == "try_split" and event["fraction"] == 0
    ]
    assert sorted(event["split_at"] for event in zero_splits) == sorted(
        c["start"] for c in checkpoints
    )


def test_which_runners_split_a_running_restriction(recorded_read, seekable_archive):
    runner, _, events = recorded_read
    index = archive_index(seekable_archive, os.path.getsize(seekable_archive))

    dynamic = [
        event
        for event in events
        if event["kind"] == "try_split" and event["fraction"] > 0
    ]
    if not ISSUES_DYNAMIC_SPLITS[runner]:
        assert dynamic == []
        return
    granted = [event for event in dynamic if event["split_at"] is not None]
    assert granted, f"{runner} asked for no split that the reader granted: {dynamic}"
    passes = {event["start"] for event in events if event["kind"] == "pass"}
    for event in granted:
        # Splits fall on frame boundaries, and the residual is read.
        assert event["split_at"] in index.decompressed_offsets
        assert event["split_at"] in passes


def test_prism_split_requests_on_a_single_frame_dump_are_refused(real_data, tmp_path):
    _require("prism")
    path = real_sample("RC_2006-01.zst")

    events = _run_recorded(path, "prism", str(tmp_path), SPLIT_BYTES, defer_once=False)

    requested = [event for event in events if event["kind"] == "try_split"]
    assert requested, "Prism asked for no split while the bundle stalled"
    assert [event["split_at"] for event in requested] == [None] * len(requested)
    assert [
        (event["start"], event["stop"]) for event in events if event["kind"] == "pass"
    ] == [(0, END_OF_ARCHIVE)]
    assert _read_lines(str(tmp_path)) == archive_lines(path)


class CountPerKey(beam.DoFn):
    """Notes each key's values in a bag and emits them when the window ends.

    The sixth value stalls its bundle for a second, long enough for a runner
    that splits stalled bundles to split this one.
    """

    SEEN = BagStateSpec("seen", VarIntCoder())
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def process(
        self,
        element,
        seen=beam.DoFn.StateParam(SEEN),
        end=beam.DoFn.TimerParam(END),
        window=beam.DoFn.WindowParam,
    ):
        if element[1] == 5:
            time.sleep(1.0)
        seen.add(element[1])
        end.set(window.end)

    @on_timer(END)
    def flush(self, key=beam.DoFn.KeyParam, seen=beam.DoFn.StateParam(SEEN)):
        yield key, sorted(seen.read())


def _count_per_key(flags: list[str]) -> None:
    options = PipelineOptions(flags)
    pipeline = beam.Pipeline(runner=runner_for(options), options=options)
    counted = (
        pipeline
        | beam.Create([("k", value) for value in range(200)])
        | beam.Reshuffle()
        | beam.ParDo(CountPerKey())
    )
    assert_that(counted, equal_to([("k", list(range(200)))]))
    pipeline.run().wait_until_finish()


@pytest.mark.parametrize("runner", list(RUNNER_FLAGS))
def test_keyed_state_stays_whole_when_a_stateful_bundle_stalls(runner):
    _require(runner)

    _count_per_key(list(RUNNER_FLAGS[runner]))


@pytest.mark.xfail(
    reason="Prism 2.77, when it splits a stalled stateful bundle, releases the keys of the"
    " split-off elements while the first bundle still holds them; a second bundle of the"
    " same key runs at once and the timer fires once per bundle, each with part of the"
    " state. runner_for turns Prism's splitting off for this reason.",
    strict=False,
)
def test_prism_with_its_own_splitting_breaks_keyed_state():
    _require("prism")

    _count_per_key(["--runner=PrismRunner", f"--experiments={prism.KEEP_SPLITS}"])


def test_makefile_fetches_the_flink_job_server_that_the_runner_looks_for():
    with open(os.path.join(PROJECT_ROOT, "Makefile"), encoding="utf-8") as handle:
        makefile = handle.read()

    assert (
        re.search(r"^FLINK_VERSION := (\S+)$", makefile, re.M).group(1)
        == flink.FLINK_VERSION
    )
    assert (
        re.search(r"^BEAM_VERSION := (\S+)$", makefile, re.M).group(1)
        == flink.BEAM_VERSION
    )
    assert flink.FLINK_VERSION in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS


def test_prism_binary_is_found_locally_and_never_downloaded(tmp_path, monkeypatch):
    binary = tmp_path / "prism"
    binary.write_bytes(b"#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(prism.ENV_VAR, str(binary))

    options = PipelineOptions(["--runner=PrismRunner"])
    prism.prepare(options)
    assert options.view_as(PrismRunnerOptions).prism_location == str(binary)
    assert options.view_as(DebugOptions).experiments == [prism.DISABLE_SPLITS]
    kept = PipelineOptions(
        ["--runner=PrismRunner", f"--experiments={prism.KEEP_SPLITS}"]
    )
    prism.prepare(kept)
    assert kept.view_as(DebugOptions).experiments == [prism.KEEP_SPLITS]

    given = PipelineOptions(
        ["--runner=PrismRunner", "--prism_location=https://example.invalid/prism.zip"]
    )
    with pytest.raises(OptionError) as refused:
        prism.prepare(given)
    assert str(refused.value) == (
        "--prism_location 'https://example.invalid/prism.zip' is a URL; this job never"
        " downloads runner tools: name a local file"
    )

    monkeypatch.setenv(prism.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(OptionError) as missing:
        prism.prepare(PipelineOptions(["--runner=PrismRunner"]))
    assert str(missing.value) == (
        f"{prism.ENV_VAR}={str(tmp_path / 'missing')!r} is not a file (it names --prism_location)"
    )


def test_flink_gets_the_local_job_server_jar_and_a_loopback_environment(
    tmp_path, monkeypatch
):
    jar = (
        tmp_path
        / f"beam-runners-flink-{flink.FLINK_VERSION}-job-server-{flink.BEAM_VERSION}.jar"
    )
    jar.write_bytes(b"")
    monkeypatch.setenv(flink.ENV_VAR, str(jar))

    embedded = PipelineOptions(["--runner=FlinkRunner", "--flink_master=[local]"])
    flink.prepare(embedded)
    assert embedded.view_as(FlinkRunnerOptions).flink_job_server_jar == str(jar)
    assert embedded.view_as(FlinkRunnerOptions).flink_version == flink.FLINK_VERSION
    assert embedded.view_as(PortableOptions).environment_type == "LOOPBACK"

    with pytest.raises(OptionError) as remote:
        flink.prepare(
            PipelineOptions(["--runner=FlinkRunner", "--flink_master=flink-jm:8081"])
        )
    assert str(remote.value) == (
        "--flink_master flink-jm:8081 is a cluster: give --environment_type EXTERNAL"
        " (a Beam worker pool beside each task manager), PROCESS or DOCKER"
    )
    with pytest.raises(OptionError) as external:
        flink.prepare(
            PipelineOptions(
                [
                    "--runner=FlinkRunner",
                    "--flink_master=flink-jm:8081",
                    "--environment_type=EXTERNAL",
                ]
            )
        )
    assert str(external.value) == (
        "--environment_type EXTERNAL needs --environment_config (the boot command for"
        " PROCESS, the worker pool's address for EXTERNAL)"
    )
    pooled = PipelineOptions(
        [
            "--runner=FlinkRunner",
            "--flink_master=flink-jm:8081",
            "--environment_type=EXTERNAL",
            "--environment_config=localhost:50000",
        ]
    )
    flink.prepare(pooled)
    assert pooled.view_as(PortableOptions).environment_type == "EXTERNAL"


def test_an_unknown_runner_is_refused_by_name():
    with pytest.raises(OptionError) as refused:
        runner_for(PipelineOptions(["--runner=SparkRunner"]))
    assert str(refused.value) == (
        "--runner SparkRunner is not one this job runs on (DataflowRunner, DirectRunner,"
        " FlinkRunner, PrismRunner, SwitchingDirectRunner)"
    )
