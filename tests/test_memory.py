"""The memory guard: decoder costs, the shared ledger, waiting and throttling."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import orjson
import psutil
import pytest
import zstandard

from beam_pipeline.synth import SynthSpec, record_lines
from tests.helpers import (
    PROJECT_ROOT,
    real_sample,
    start_cli,
    summary,
    written_records,
)
from transforms import memory
from transforms.memory import MemoryBoundTooSmall, MemoryGuard, TreeSampler
from transforms.reader import archive_index
from transforms.sinks import WriteBatchFiles
from transforms.zstd_frames import MAX_WINDOW_SIZE, FrameIndex

MIB = 2**20

# Three archives of a 512 MiB window, each decompressing to more than the
# window so that a decoder really fills it (python-zstandard's memory grows
# with its output up to the window: measured 512.8 MiB after 570 MB).
WINDOW_LOG = 29
UNIT_BYTES = 30_000_000
REPEATS = 19
# The bound fits the launcher, two idle workers (about 190 MiB each) and one
# decoder with its buffers (512 + 1 + 5 * 1 + 2 * 64 = 646 MiB), not two.
BOUND_MB = 1450

# A process that holds a reservation until it is killed.
_HOLDER = """
import sys, time
from transforms.memory import MemoryGuard
guard = MemoryGuard.for_worker(int(sys.argv[1]), sys.argv[2])
reservation = guard.try_reserve(int(sys.argv[3]), "held.zst")
print("held" if reservation is not None else "refused", flush=True)
time.sleep(600)
"""


def _environment() -> dict:
    return dict(
        os.environ, NO_GCE_CHECK="true", PYTHONUNBUFFERED="1", PYTHONPATH=PROJECT_ROOT
    )


def _write_repeated(path: str, unit: bytes, repeats: int, window_log: int) -> None:
    """One frame of ``repeats`` copies of ``unit``, no content size, like the dumps.

    Long-distance matching finds the copies, so writing 570 MB takes about
    a second, while the decoder still writes every byte into its window.
    """
    params = zstandard.ZstdCompressionParameters.from_level(
        1,
        window_log=window_log,
        enable_ldm=True,
        write_checksum=1,
        write_content_size=0,
        threads=-1,
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    with (
        open(path, "wb") as handle,
        compressor.stream_writer(handle, closefd=False) as writer,
    ):
        for _ in range(repeats):
            writer.write(unit)


@pytest.fixture(scope="module")
def large_window_archives(tmp_path_factory):
    """Three copies of a 570 MB archive with a 512 MiB window, and its unit's lines."""
    folder = tmp_path_factory.mktemp("large_windows")
    unit_lines = list(record_lines(SynthSpec(target_bytes=UNIT_BYTES, month="2019-10")))
    first = str(folder / "RC_2019-10.zst")
    _write_repeated(first, b"".join(unit_lines), REPEATS, WINDOW_LOG)
    paths = [first]
    for month in ("2019-11", "2019-12"):
        paths.append(str(folder / f"RC_{month}.zst"))
        shutil.copyfile(first, paths[-1])
    return paths, unit_lines


@pytest.fixture()
def ledger_key(tmp_path):
    """A ledger of its own for each test, removed afterwards."""
    key = str(tmp_path / "ledger-key")
    yield key
    shutil.rmtree(memory.ledger_folder(key), ignore_errors=True)


class _TreePeak:
    """Samples the resident memory of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self.total = 0
        self.per_process: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.per_process[process.pid] = max(
                    self.per_process.get(process.pid, 0), rss
                )
            self.total = max(self.total, total)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_three_large_window_archives_on_two_workers_stay_under_the_bound(
    large_window_archives, tmp_path
):
    paths, unit_lines = large_window_archives
    output = str(tmp_path / "out")
    process = start_cli(
        [
            *(f"--input={path}" for path in paths),
            f"--output={output}",
            "--subreddit=AskMen",
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
            f"--max_memory_mb={BOUND_MB}",
        ],
        env=_environment(),
    )
    peak = _TreePeak(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        peak.stop()

    assert process.returncode == 0, stderr[-3000:]
    matched = [
        line[:-1] for line in unit_lines if orjson.loads(line)["subreddit"] == "AskMen"
    ]
    assert sorted(written_records(output)) == sorted(matched * REPEATS * len(paths))
    result = summary(output)
    assert result["records_read"] == len(unit_lines) * REPEATS * len(paths)
    assert result["max_memory_bytes"] == BOUND_MB * MIB
    # Both workers were handed an archive while the other read: at least
    # one had to wait for the other's decoder to be released.
    assert result["memory_deferrals"] >= 1

    assert peak.total < BOUND_MB * MIB, f"peak {peak.total / MIB:.0f} MiB"
    launcher = peak.per_process.pop(process.pid)
    workers = sorted(peak.per_process.values(), reverse=True)
    # Each worker's decoder really filled its 512 MiB window, and the two
    # with the launcher would have passed the bound had they read at once.
    assert workers[1] > 2**WINDOW_LOG
    assert launcher + workers[0] + workers[1] > BOUND_MB * MIB


class HoardingHandler(WriteBatchFiles):
    """Writes each batch, and keeps every record it was given: a runaway handler."""

    kept: list = []

    def hand_on(
        self, batch_id: str, key: str, records: list[tuple[int, bytes]]
    ) -> None:
        super().hand_on(batch_id, key, records)
        HoardingHandler.kept.extend(bytes(bytearray(line)) for _, line in records)


def test_a_runaway_handler_is_throttled_and_named_while_the_job_finishes(tmp_path):
    # Few subreddits, so that most batches fill, and reach the handler,
    # while the archive is still being read.
    unit = b"".join(
        record_lines(SynthSpec(target_bytes=20_000_000, month="2019-10", subreddits=0))
    )
    path = str(tmp_path / "RC_2019-10.zst")
    params = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=22, write_checksum=1, write_content_size=0, threads=-1
    )
    with open(path, "wb") as handle:
        compressor = zstandard.ZstdCompressor(compression_params=params)
        with compressor.stream_writer(handle, closefd=False) as writer:
            for _ in range(5):
                writer.write(unit)
    output = str(tmp_path / "out")

    job = start_cli(
        [
            f"--input={path}",
            f"--output={output}",
            "--batch_handler=tests.test_memory:HoardingHandler",
            "--max_record_bytes=1048576",
            # Room for the launcher (about 180 MiB) and a 12 MiB decoder, not
            # for the 100 MB of records the handler keeps.
            "--max_memory_mb=250",
        ],
        env=_environment(),
    )
    _, stderr = job.communicate(timeout=300)

    assert job.returncode == 0, stderr[-3000:]
    lines = unit[:-1].split(b"\n")
    assert sorted(written_records(output)) == sorted(lines * 5)
    assert summary(output)["memory_throttles"] >= 1
    warnings = [line for line in stderr.splitlines() if "slowing intake" in line]
    assert warnings, stderr[-3000:]
    assert "of the 250 MiB bound (--max_memory_mb)" in warnings[0]
    # The in-process DirectRunner: the launcher runs the worker itself.
    assert warnings[0].endswith(
        f", is records and batches held in process {job.pid}, which launched the"
        " job and runs its worker (a giant batch, a batch handler that keeps what"
        " it is given, or matched records kept between stages); slowing intake"
    )


def test_decoder_cost_is_the_header_window_plus_buffers(real_data):
    buffers = MIB + 3 * MIB + 2 * 64 * MIB

    dump = real_sample("RC_2005-12.zst")
    index = archive_index(dump, os.path.getsize(dump))
    assert index.window_size == MAX_WINDOW_SIZE
    assert (
        MemoryGuard.decoder_cost(index, MIB, MIB, 64 * MIB) == MAX_WINDOW_SIZE + buffers
    )

    small = real_sample("AskMen_submissions_2019-10.zst")
    index = archive_index(small, os.path.getsize(small))
    assert MemoryGuard.decoder_cost(index, MIB, MIB, 64 * MIB) == 2 * MIB + buffers
    # Blocks decoded ahead of parsing are held too.
    assert MemoryGuard.decoder_cost(index, MIB, MIB, 64 * MIB, 2) == 4 * MIB + buffers

    # Frames that declare a 2 GiB window but hold less keep no more history
    # than the largest of them.
    index = FrameIndex(
        (0, 1000, 2000),
        (0, 4 * MIB, 9 * MIB),
        10 * MIB,
        3000,
        MAX_WINDOW_SIZE,
        "seek table",
    )
    largest = 5 * MIB
    assert MemoryGuard.decoder_cost(index, MIB, MIB, 64 * MIB) == largest + buffers
    assert memory.peak_memory_bytes(300 * MIB, largest, 2, MIB, MIB, 64 * MIB) == (
        300 * MIB + 2 * (largest + buffers)
    )


def test_a_decoder_larger_than_the_bound_fails_at_once_naming_the_fix(ledger_key):
    guard = MemoryGuard(256 * MIB, ledger_key)

    with pytest.raises(MemoryBoundTooSmall) as caught:
        guard.try_reserve(300 * MIB, "RC_2023-01.zst", wait_secs=60)

    message = str(caught.value)
    assert message.startswith(
        "RC_2023-01.zst: its decoder needs 300 MiB (window and buffers), more"
        " than the whole bound of 256 MiB; raise --max_memory_mb to at least"
    )
    assert "or lower --max_record_bytes and --block_bytes" in message


def test_a_reservation_is_granted_when_nothing_else_is_open_however_full(
    ledger_key, caplog
):
    # This process alone already uses more than the bound leaves: refusing
    # would wait for a release that can never come.
    guard = MemoryGuard(80 * MIB, ledger_key)

    with caplog.at_level(logging.WARNING, logger="transforms.memory"):
        reservation = guard.try_reserve(64 * MIB, "alone.zst")

    assert reservation is not None
    assert [record.getMessage()[:40] for record in caplog.records] == [
        "opening alone.zst although its decoder ("
    ]
    reservation.release()
    assert guard.open_bytes == 0


def test_another_process_reservation_makes_a_reader_wait_until_it_dies(ledger_key):
    bound = 1024 * MIB
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(bound), ledger_key, str(600 * MIB)],
        cwd=PROJECT_ROOT,
        env=_environment(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        guard = MemoryGuard(bound, ledger_key)
        held = guard.state()
        assert [
            (member.pid, member.reserved, member.archives) for member in held.members
        ] == [
            (pid, size, archives)
            for pid, size, archives in sorted(
                [(holder.pid, 600 * MIB, ("held.zst",)), (os.getpid(), 0, ())]
            )
        ]

        started = time.monotonic()
        assert guard.try_reserve(600 * MIB, "waiting.zst", wait_secs=0.5) is None
        assert time.monotonic() - started >= 0.5

        # Killed without releasing: its entries are dropped by the next reader.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        reservation = guard.try_reserve(600 * MIB, "waiting.zst")
        assert reservation is not None
        assert [member.pid for member in guard.state().members] == [os.getpid()]
        reservation.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_an_entry_whose_pid_now_names_another_process_is_dropped(ledger_key):
    guard = MemoryGuard(1024 * MIB, ledger_key)
    # The parent of this process is alive, but started long after 1970: an
    # entry written by a process of that PID is from a dead one.
    stale = os.path.join(
        memory.ledger_folder(ledger_key), f"reserve-{os.getppid()}-1.json"
    )
    with open(stale, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "pid": os.getppid(),
                "started": 1.0,
                "archive": "old.zst",
                "size": 900 * MIB,
            },
            handle,
        )

    reservation = guard.try_reserve(600 * MIB, "new.zst")

    assert reservation is not None
    assert not os.path.exists(stale)
    reservation.release()


def test_the_default_bound_is_decided_once_for_the_whole_job(ledger_key):
    first = MemoryGuard(memory.AUTO_MAX_MEMORY, ledger_key, role="launcher")
    with open(
        os.path.join(memory.ledger_folder(ledger_key), "bound.json"), encoding="utf-8"
    ) as handle:
        written = json.load(handle)["bytes"]
    assert first.max_bytes == written
    assert 0 < written <= psutil.virtual_memory().total * memory.DEFAULT_SHARE

    later = MemoryGuard(memory.AUTO_MAX_MEMORY, ledger_key)
    assert later.max_bytes == written


def test_the_last_process_to_leave_removes_the_ledger(ledger_key):
    guard = MemoryGuard.for_launcher(512 * MIB, ledger_key)
    folder = memory.ledger_folder(ledger_key)
    reservation = guard.try_reserve(100 * MIB, "a.zst")
    reservation.release()
    assert os.path.isdir(folder)

    guard.leave()

    assert not os.path.exists(folder)
    # A guard of the same key in a later job joins afresh.
    again = MemoryGuard.for_launcher(512 * MIB, ledger_key)
    assert again is not guard
    assert [member.role for member in again.state().members] == ["launcher"]
    again.leave()


def test_throttle_slows_intake_and_names_memory_grown_in_the_worker(ledger_key, caplog):
    idle = psutil.Process().memory_info().rss
    # A giant batch held after the reader: memory this process touches after
    # it joined, more than its own start-up memory.
    hoard_bytes = idle + 300 * MIB
    guard = MemoryGuard(idle + hoard_bytes - 100 * MIB, ledger_key)
    reservation = guard.try_reserve(10 * MIB, "busy.zst")
    hoard = bytearray(hoard_bytes)
    for offset in range(0, len(hoard), 4096):
        hoard[offset] = 1
    try:
        with caplog.at_level(logging.WARNING, logger="transforms.memory"):
            paused = guard.throttle()
            # The next chunk, right after, is not sampled again.
            assert guard.throttle() == 0.0
    finally:
        del hoard
        reservation.release()

    # Past the bound: the longest pause.
    assert paused == pytest.approx(memory.THROTTLE_MAX_PAUSE_SECS)
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning.startswith("resident memory of the job's processes is ")
    assert "MiB is the processes' own, up to 10 MiB decoder windows, and" in warning
    assert warning.endswith(
        f" is records and batches buffered in worker {os.getpid()} beyond its decoders"
        " (a giant batch, or a batch handler that keeps what it is given);"
        " slowing intake"
    )


def test_tree_sampler_sees_memory_of_child_processes():
    sampler = TreeSampler(interval_secs=0.05).start()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; b = bytearray(200 * 2**20); b[::4096] = b'1' * len(b[::4096]); print('ok', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ok"
        time.sleep(0.3)
        own = psutil.Process().memory_info().rss
    finally:
        child.kill()
        child.wait(timeout=10)
    peak = sampler.stop()
    assert peak >= own + 200 * MIB


def test_the_guard_is_off_with_a_bound_of_zero(ledger_key):
    guard = MemoryGuard(0, ledger_key)
    reservation = guard.try_reserve(10 * 2**30, "huge.zst")
    assert reservation is not None
    assert guard.open_reservations() == [("huge.zst", 10 * 2**30)]
    assert guard.throttle() == 0.0
    reservation.release()
    assert guard.open_reservations() == []


def test_the_repeated_archive_decodes_to_its_unit_repeated(tmp_path):
    unit_lines = list(record_lines(SynthSpec(target_bytes=200_000)))
    path = str(tmp_path / "repeated.zst")
    _write_repeated(path, b"".join(unit_lines), 3, 22)

    with open(path, "rb") as handle:
        decoder = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
        data = decoder.stream_reader(handle).read()

    assert data == b"".join(unit_lines) * 3
