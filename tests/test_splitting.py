"""Runner-initiated splits and checkpoints of the reader, record for record.

Splits are forced as Beam's own FnApiRunner tests force them
(apache_beam/runners/portability/fn_api_runner/fn_runner_test.py): a split
manager registered for the reading stage with ``fn_runner.split_manager``
holds the reader at a chosen block and asks for a split at a chosen
fraction, and the ``--direct_test_splits`` option asks for splits at chosen
times. Both need the in-process gRPC worker, where the runner can send a
split request while a bundle runs. Checkpoints the DoFn asks for itself go
through ``defer_remainder``. Every run must produce exactly the records of
the unsplit run.
"""

from __future__ import annotations

import glob
import json
import os
import random
import threading
import uuid

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.transforms import environments

from beam_pipeline.reframe import reframe
from tests.helpers import (
    archive_lines,
    decompress_file,
    real_sample,
    run,
    written_records,
)
from transforms.reader import (
    DAMAGE_TAG,
    DEAD_LETTER_TAG,
    ArchiveSpec,
    LineBlock,
    ReadArchiveBlocks,
    ReaderConfig,
)

# The reading stage as the FnApiRunner names it: the ParDo inside the
# "ReadArchives" transform that adds the tagged outputs.
READ_STAGE = "ReadArchives/ParDo(ReadArchiveBlocks)"
MIB = 2**20
REAL = [
    "RC_2005-12.zst",
    "RC_2006-01.zst",
    "AskWomen_submissions_2019-10.zst",
    "AskMen_submissions_2019-10.zst",
]
# Small blocks make many claims, so that a split can fall between them.
CONFIG = ReaderConfig(block_bytes=64 * 1024, read_chunk_bytes=64 * 1024)
# How long the split manager waits for the reader to reach a block.
WAIT_SECS = 60.0

_LIVE: dict[str, object] = {}


def _live(key: str):
    return _LIVE[key]


class _Shared:
    """An object that pickles as a reference, for the in-process worker."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex
        _LIVE[self.key] = self

    def __reduce__(self):
        return _live, (self.key,)


class Gate(_Shared):
    """Counts the blocks leaving the reader; can hold the reader at one."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()
        self.count = 0
        self.bundles = 0
        self._holds: dict[int, threading.Event] = {}

    def passing(self, block: LineBlock) -> LineBlock:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
            hold = self._holds.get(self.count)
        if hold is not None:
            hold.wait(WAIT_SECS)
        return block

    def hold_at(self, count: int) -> threading.Event:
        """Holds the reader when it emits block ``count``, until set."""
        with self._changed:
            self._holds[count] = threading.Event()
            return self._holds[count]

    def wait_for(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= count, WAIT_SECS):
                raise RuntimeError(f"the reader never emitted block {count}")


class Sink(_Shared):
    """Collects what the pipeline emits, in the test's process."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.lines: list[tuple[int, int, bytes]] = []
        self.markers: list[tuple[int, int]] = []

    def add(self, block: LineBlock) -> None:
        if not block.data:
            with self._lock:
                self.markers.append((block.archive_id, block.offset))
            return
        lines = block.data.split(b"\n")
        if block.data.endswith(b"\n"):
            lines.pop()
        offset = block.offset
        found = []
        for line in lines:
            found.append((block.archive_id, offset, line))
            offset += len(line) + 1
        with self._lock:
            self.lines.extend(found)


class DeferringReader(ReadArchiveBlocks):
    """The reader, checkpointing itself as it passes chosen offsets.

    The checkpoint goes through the DoFn's own ``defer_remainder``, as the
    reader's memory deferral does, but in the middle of the archive. Each
    offset is passed by exactly one pass: the residual starts beyond it.
    """

    def __init__(
        self, config: ReaderConfig, names: dict[int, str], offsets: tuple[int, ...]
    ) -> None:
        super().__init__(config, names)
        self._offsets = offsets

    def process(self, element, tracker=beam.DoFn.RestrictionParam()):
        start = tracker.current_restriction().start
        for output in super().process(element, tracker):
            yield output
            if isinstance(output, LineBlock):
                end = output.offset + len(output.data)
                if any(start < offset <= end for offset in self._offsets):
                    tracker.defer_remainder()


def _plan_manager(plan, gate: Gate, results: list):
    """A split manager that follows ``plan``: per bundle of the read stage,
    (blocks to wait for, fractions to ask for one after the other)."""
    bundles = []

    def manager(num_elements):
        bundles.append(num_elements)
        gate.bundles = len(bundles)
        if len(bundles) > len(plan) or plan[len(bundles) - 1] is None:
            return
        after, fractions = plan[len(bundles) - 1]
        target = gate.count + after
        release = gate.hold_at(target)
        # Hand control back so that the runner sends the bundle's input.
        yield
        gate.wait_for(target)
        for fraction in fractions:
            results.append((fraction, (yield fraction)))
        release.set()

    return manager


def read_with_splits(paths, config=CONFIG, plan=(), is_drain=False, reader=None):
    """Runs the reader over ``paths`` on the FnApiRunner, splitting as planned.

    Returns the sink, the (fraction, split response) of every request and
    the gate, whose count is the number of blocks emitted.
    """
    specs = [
        ArchiveSpec(number, path, os.path.getsize(path))
        for number, path in enumerate(paths)
    ]
    names = {spec.archive_id: spec.name for spec in specs}
    reader = reader or ReadArchiveBlocks(config, names)
    stage = f"ReadArchives/ParDo({type(reader).__name__})"
    gate, sink, results = Gate(), Sink(), []
    runner = fn_runner.FnApiRunner(
        default_environment=environments.EmbeddedPythonGrpcEnvironment.default(),
        is_drain=is_drain,
    )
    with fn_runner.split_manager(stage, _plan_manager(plan, gate, results)):
        with beam.Pipeline(runner=runner) as pipeline:
            read = (
                pipeline
                | "Archives" >> beam.Create(specs, reshuffle=False)
                | "ReadArchives"
                >> beam.ParDo(reader).with_outputs(
                    DEAD_LETTER_TAG, DAMAGE_TAG, main="blocks"
                )
            )
            _ = (
                read.blocks
                | "Gate" >> beam.Map(gate.passing)
                | "Sink" >> beam.Map(sink.add)
            )
    return sink, results, gate


def accepted(response) -> bool:
    """Whether a split response carries a residual restriction."""
    return response is not None and len(response.residual_roots) > 0


def expected_lines(paths) -> list[tuple[int, int, bytes]]:
    return sorted(
        (number, offset, line)
        for number, path in enumerate(paths)
        for offset, line in archive_lines(path)
    )


@pytest.fixture(scope="module")
def archives(real_data, synthetic_archives, tmp_path_factory):
    """Single- and multi-frame archives, and a real sample reframed."""
    folder = tmp_path_factory.mktemp("reframed")
    reframed = str(folder / "AskMen_submissions_2019-10.seekable.zst")
    reframe(real_sample("AskMen_submissions_2019-10.zst"), reframed, frame_bytes=MIB)
    return {
        **{name: real_sample(name) for name in REAL},
        "single": synthetic_archives("single_3mb.zst", records=3000, seed=5),
        "seekable": synthetic_archives(
            "seekable_3mb.zst", frame_bytes=256 * 1024, records=3000, seed=5
        ),
        "reframed": reframed,
    }


@pytest.fixture(scope="module")
def unsplit(archives):
    """Each archive's lines as an unsplit run emits them, and its block count
    (end marker included)."""
    found = {}
    for name, path in archives.items():
        sink, _, gate = read_with_splits([path])
        assert sorted(sink.lines) == expected_lines([path]), name
        assert len(sink.markers) == 1
        found[name] = (sorted(sink.lines), gate.count)
    return found


def assert_same_records(sink: Sink, reference: list) -> None:
    assert sorted(sink.lines) == reference
    assert len(sink.lines) == len(set(sink.lines))
    assert len(sink.markers) == 1


@pytest.mark.parametrize("name", REAL)
def test_checkpoint_of_a_real_dump_resumes_each_record_once(name, archives, unsplit):
    reference, blocks = unsplit[name]
    plan = [(blocks // 2, [0.0])]

    sink, results, _ = read_with_splits([archives[name]], plan=plan)

    assert [accepted(response) for _, response in results] == [True]
    assert_same_records(sink, reference)


@pytest.mark.parametrize("after", ["first", "last"])
def test_checkpoint_after_the_first_and_the_last_block(after, archives, unsplit):
    reference, blocks = unsplit["RC_2006-01.zst"]
    # Block ``blocks`` is the end marker; the one before it the last lines.
    plan = [(1 if after == "first" else blocks - 1, [0.0])]

    sink, results, _ = read_with_splits([archives["RC_2006-01.zst"]], plan=plan)

    assert [accepted(response) for _, response in results] == [True]
    assert_same_records(sink, reference)


def test_single_frame_refuses_all_but_checkpoints(archives, unsplit):
    reference, blocks = unsplit["RC_2006-01.zst"]
    wild = random.Random(3).random()
    plan = [(blocks // 3, [0.01, 0.5, 0.99, wild, 0.0])]

    sink, results, _ = read_with_splits([archives["RC_2006-01.zst"]], plan=plan)

    assert [accepted(response) for _, response in results] == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert_same_records(sink, reference)


def test_checkpoints_of_a_residual_chain(archives, unsplit):
    reference, blocks = unsplit["single"]
    # A checkpoint, then one of the residual, then one of that residual.
    plan = [(blocks // 4, [0.0]), (blocks // 4, [0.0]), (2, [0.0])]

    sink, results, _ = read_with_splits([archives["single"]], plan=plan)

    assert [accepted(response) for _, response in results] == [True, True, True]
    assert_same_records(sink, reference)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.95, "random"])
def test_multi_frame_splits_at_any_fraction(fraction, archives, unsplit):
    reference, blocks = unsplit["seekable"]
    if fraction == "random":
        fraction = random.Random(11).random()
    plan = [(3, [fraction])]

    sink, results, _ = read_with_splits([archives["seekable"]], plan=plan)

    assert [accepted(response) for _, response in results] == [True]
    assert_same_records(sink, reference)


def test_multi_frame_splits_again_in_primary_and_residual(archives, unsplit):
    reference, blocks = unsplit["seekable"]
    # Halves, then halves the first half, then a quarter of what is left of
    # it; in the next bundle a checkpoint, after which nothing is left to
    # split off.
    plan = [(2, [0.5, 0.5, 0.25]), (3, [0.0, 0.5])]

    sink, results, _ = read_with_splits([archives["seekable"]], plan=plan)

    assert [accepted(response) for _, response in results] == [
        True,
        True,
        True,
        True,
        False,
    ]
    assert_same_records(sink, reference)


def test_draining_runner_splits_the_same(archives, unsplit):
    reference, _ = unsplit["seekable"]

    sink, results, _ = read_with_splits(
        [archives["seekable"]], plan=[(4, [0.5, 0.0])], is_drain=True
    )

    assert [accepted(response) for _, response in results] == [True, True]
    assert_same_records(sink, reference)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_reframed_real_dump_splits_at_its_frames(fraction, archives, unsplit):
    reference, blocks = unsplit["reframed"]
    original, _ = unsplit["AskMen_submissions_2019-10.zst"]

    sink, results, _ = read_with_splits(
        [archives["reframed"]], plan=[(blocks // 4, [fraction])]
    )

    assert [accepted(response) for _, response in results] == [True]
    assert_same_records(sink, reference)
    assert reference == original


def test_initial_splits_and_dynamic_splits_together(archives, unsplit):
    reference, _ = unsplit["seekable"]
    config = ReaderConfig(
        block_bytes=64 * 1024, read_chunk_bytes=64 * 1024, desired_split_bytes=MIB
    )

    # With several restrictions in the bundle, a small fraction still falls
    # inside the first one.
    sink, results, _ = read_with_splits(
        [archives["seekable"]], config=config, plan=[(2, [0.05])]
    )

    assert [accepted(response) for _, response in results] == [True]
    assert_same_records(sink, reference)


@pytest.mark.parametrize("name", ["RC_2005-12.zst", "seekable"])
def test_checkpoints_the_dofn_asks_for(name, archives, unsplit):
    reference, _ = unsplit[name]
    path = archives[name]
    size = len(decompress_file(path))
    offsets = (1, size // 3, size // 2)
    reader = DeferringReader(CONFIG, {0: os.path.basename(path)}, offsets)

    sink, _, gate = read_with_splits([path], reader=reader)

    assert_same_records(sink, reference)
    # The first pass and one resumed pass per checkpoint, each a bundle.
    assert gate.bundles == 4


def test_two_archives_split_in_one_bundle(archives, unsplit):
    paths = [archives["RC_2005-12.zst"], archives["seekable"]]
    plan = [(5, [0.0]), (3, [0.5])]

    sink, results, _ = read_with_splits(paths, plan=plan)

    assert sorted(sink.lines) == expected_lines(paths)
    assert len(sink.lines) == len(set(sink.lines))
    assert sorted(sink.markers) == [(0, 678432), (1, len(decompress_file(paths[1])))]
    assert accepted(results[0][1])


# The whole job, with splits at set times through --direct_test_splits.


def _job(inputs, output, *extra):
    return run(
        [
            *(f"--input={path}" for path in inputs),
            f"--output={output}",
            "--batch_size=500",
            "--block_bytes=16384",
            "--read_chunk_bytes=16384",
            *extra,
        ]
    )


def test_job_output_is_the_same_with_timed_splits(archives, tmp_path):
    inputs = [archives["RC_2006-01.zst"], archives["reframed"]]
    plain = _job(inputs, str(tmp_path / "plain"))
    splits = {
        READ_STAGE: {
            "timings": [0.05, 0.1, 0.2, 0.3],
            "fractions": [0.5, 0.0, 0.3, 0.0],
        }
    }
    expected = sorted(line for path in inputs for _, line in archive_lines(path))
    assert sorted(written_records(str(tmp_path / "plain"))) == expected
    assert _passes(str(tmp_path / "plain")) == 2

    # The splits are timed from the bundle's start, so on a fast machine the
    # reading can end before the first; every attempt must be exact, and one
    # of them must have been split.
    split_taken = False
    for attempt in range(3):
        output = str(tmp_path / f"split{attempt}")
        split = _job(
            inputs,
            output,
            "--direct_running_mode=multi_threading",
            "--direct_num_workers=1",
            f"--direct_test_splits={json.dumps(splits)}",
        )
        assert sorted(written_records(output)) == expected
        assert split["records_read"] == plain["records_read"] == len(expected)
        if _passes(output) > 2:
            split_taken = True
            break
    assert split_taken, "no timed split took effect in three attempts"


def _passes(output: str) -> int:
    """Reading passes over all archives, from the workers' progress files."""
    passes = 0
    for path in glob.glob(os.path.join(output, "_progress", "worker-*.json")):
        with open(path, encoding="utf-8") as handle:
            passes += sum(
                archive["passes_done"] for archive in json.load(handle)["archives"]
            )
    return passes


def test_two_worker_processes_share_a_multi_frame_archive(archives, tmp_path):
    path = archives["seekable"]
    output = str(tmp_path / "out")

    result = _job(
        [path],
        output,
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
        f"--desired_split_bytes={MIB}",
    )

    assert sorted(written_records(output)) == sorted(
        line for _, line in archive_lines(path)
    )
    assert result["records_read"] == 3000
    # Each worker process writes its own progress file, named by its pid,
    # with what it read of each archive; both read part of this one.
    reports = []
    for report_path in glob.glob(os.path.join(output, "_progress", "worker-*.json")):
        with open(report_path, encoding="utf-8") as handle:
            report = json.load(handle)
        for archive in report["archives"]:
            if archive["name"] == os.path.basename(path) and archive["passes_done"]:
                reports.append((report["pid"], archive["lines"]))
    assert len({pid for pid, _ in reports}) == 2
    assert all(lines > 0 for _, lines in reports)
