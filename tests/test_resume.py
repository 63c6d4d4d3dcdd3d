"""Interrupted runs resume where they stopped, with nothing lost or doubled."""

from __future__ import annotations

import collections
import glob
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import (
    archive_lines,
    read_batches,
    run,
    run_cli,
    start_cli,
    summary,
)

BATCH_SIZE = 400


@pytest.fixture(scope="module")
def archives(synthetic_archives):
    # Few subreddits, so that most records leave in full batches while the
    # archives are still being read.
    return [
        synthetic_archives(
            f"RC_2019-0{month}.zst",
            target_bytes=25 * 10**6,
            month=f"2019-0{month}",
            seed=month,
            subreddits=40,
        )
        for month in (1, 2)
    ]


def job_arguments(archives, output):
    return [
        *(f"--input={path}" for path in archives),
        f"--output={output}",
        f"--batch_size={BATCH_SIZE}",
    ]


def start_job(arguments):
    return start_cli(
        arguments, stdout=subprocess.DEVNULL, text=False, start_new_session=True
    )


def kill_when(process, ready, timeout=300.0) -> bool:
    """SIGKILLs the job's process group once ``ready()``; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("the job neither reached the kill point nor ended")


def batch_count(output):
    return len(glob.glob(os.path.join(output, "batches", "*.jsonl.zst")))


def all_lines(archives):
    return sorted(line for path in archives for _, line in archive_lines(path))


def assert_exact(output, archives, batch_size=BATCH_SIZE):
    """Every record once, batch sizes within the contract, no partial file."""
    batches = read_batches(output)
    written = sorted(line for lines in batches.values() for line in lines)
    assert len(written) == len(all_lines(archives))
    counts = collections.Counter(written)
    assert max(counts.values()) == 1
    assert written == all_lines(archives)
    leftovers = [
        name
        for name in os.listdir(os.path.join(output, "batches"))
        if not name.endswith(".jsonl.zst")
    ]
    assert leftovers == []
    assert all(len(lines) <= batch_size for lines in batches.values())


def test_kills_at_several_points_then_resume_gives_the_clean_output(archives, tmp_path):
    output = str(tmp_path / "out")
    arguments = job_arguments(archives, output)
    total = len(all_lines(archives))

    # Killed soon after the first batches, then again later in the resumed run.
    for threshold in (3, 40):
        process = start_job(arguments)
        killed = kill_when(
            process, lambda at_least=threshold: batch_count(output) >= at_least
        )
        assert killed, process.stderr.read().decode()

    finished = run_cli(arguments)
    assert finished.returncode == 0, finished.stderr
    assert_exact(output, archives)
    result = summary(output)
    assert result["resumed"] is True
    # The resumed run wrote only what was missing.
    assert result["records_written"] < total
    assert result["records_written"] + result["records_skipped_on_resume"] <= total


def test_kill_in_the_middle_of_writing_a_batch(archives, tmp_path):
    output = str(tmp_path / "out")
    arguments = job_arguments(archives, output)
    temporary = os.path.join(output, "_tmp")

    def writing_a_batch():
        names = os.listdir(temporary) if os.path.isdir(temporary) else []
        return any(name.endswith(".jsonl.zst.part") for name in names)

    # Larger batches take longer to write, so a kill can land inside one.
    arguments = [*arguments, f"--batch_size={4 * BATCH_SIZE}"]
    caught = False
    for _ in range(10):
        process = start_job(arguments)
        if kill_when(process, writing_a_batch) and writing_a_batch():
            caught = True
            break
    assert caught, "no kill landed while a batch was being written"
    batches = os.path.join(output, "batches")
    # The first batch may not have reached batches/ yet, then it does not exist.
    listed = os.listdir(batches) if os.path.isdir(batches) else []
    assert not [name for name in listed if not name.endswith(".jsonl.zst")]

    finished = run_cli(arguments)
    assert finished.returncode == 0, finished.stderr
    assert_exact(output, archives, batch_size=4 * BATCH_SIZE)
    assert not os.listdir(temporary)


def test_rerun_of_a_finished_job_does_nothing(real_data, tmp_path):
    output = str(tmp_path / "out")
    arguments = [
        f"--input={os.path.join(real_data, 'RC_2005-12.zst')}",
        f"--output={output}",
    ]
    first = run(arguments)
    before = sorted(os.listdir(os.path.join(output, "batches")))

    again = run(arguments)

    assert first["records_written"] == 1075
    # The earlier summary stands, with its counters; nothing was read again.
    assert again["nothing_left_to_do"] is True
    assert again["records_written"] == 1075
    assert summary(output)["records_written"] == 1075
    assert sorted(os.listdir(os.path.join(output, "batches"))) == before


def test_changed_arguments_are_refused_unless_restart(real_data, tmp_path):
    output = str(tmp_path / "out")
    path = os.path.join(real_data, "RC_2005-12.zst")
    assert (
        run_cli(
            [f"--input={path}", f"--output={output}", "--batch_size=100"]
        ).returncode
        == 0
    )

    refused = run_cli(
        [
            f"--input={path}",
            f"--output={output}",
            "--batch_size=50",
            "--subreddit=reddit.com",
        ]
    )
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: --output '{output}' holds a run with other arguments (batch_size, subreddits differ);"
        " rerun with the same arguments to resume it, add --restart to discard it, or choose another --output"
    )

    restarted = run_cli(
        [f"--input={path}", f"--output={output}", "--batch_size=50", "--restart"]
    )
    assert restarted.returncode == 0, restarted.stderr
    sizes = sorted(len(lines) for lines in read_batches(output).values())
    assert sum(sizes) == 1075 and max(sizes) == 50


def test_a_second_run_on_the_same_output_is_refused(archives, tmp_path):
    output = str(tmp_path / "out")
    arguments = job_arguments(archives, output)
    first = start_job(arguments)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(output, "_state", "job.json")):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)

        second = run_cli(arguments)

        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"error: --output '{output}' is in use by another run (pid {first.pid} on "
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
