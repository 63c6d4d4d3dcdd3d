"""Runs one command and measures its wall time, CPU time and memory over time.

Each measured program runs as a child process of its own, so its peak
memory is its own and not the benchmark's. Memory is the resident set of the
whole process tree (a DirectRunner in multi-processing mode runs its workers
as children), sampled a few times a second; the largest single process's
peak comes exactly from the kernel when the child is reaped.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Sequence

import psutil

__all__ = ["Measurement", "Sample", "measure"]

# Seconds between two samples of memory and progress.
SAMPLE_SECS = 0.25


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample: seconds since start, tree RSS, decompressed bytes so far."""

    secs: float
    rss: int
    decompressed: int | None


@dataclasses.dataclass
class Measurement:
    """What one run of a command took."""

    command: list[str]
    returncode: int
    wall_secs: float
    cpu_secs: float
    peak_rss: int
    max_process_rss: int
    samples: list[Sample]
    output_tail: str

    def check(self) -> None:
        """Raises RuntimeError, with the end of its output, if the run failed."""
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.command)} exited with {self.returncode}:\n{self.output_tail}"
            )


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def _decompressed_so_far(progress_dir: str | None) -> int | None:
    """Decompressed bytes all workers have reported in their progress files."""
    if not progress_dir:
        return None
    total = 0
    for path in glob.glob(os.path.join(progress_dir, "worker-*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            # A file is replaced while being read now and then; the next
            # sample reads it whole.
            continue
        total += sum(
            archive.get("decompressed", 0) for archive in state.get("archives", [])
        )
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    command: Sequence[str],
    env: dict | None = None,
    cwd: str | None = None,
    progress_dir: str | None = None,
    log_path: str | None = None,
) -> Measurement:
    """Runs ``command`` to its end, sampling its memory and progress.

    Args:
        command: the program and its arguments.
        env: the environment to run it in; this process's when None.
        cwd: the folder to run it in.
        progress_dir: where the job writes its per-worker progress files, so
            the samples also carry decompressed bytes; None for programs that
            write none.
        log_path: a file that receives the program's output; a temporary
            one when None. Its end is returned either way.

    Returns:
        The measurement; CPU time covers the program and every descendant
        it waited for.
    """
    cpu_before = _children_cpu()
    # A child's kernel peak starts from this process's own: the memory it
    # shared with it before exec. Below that, only the samples tell.
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Output goes to a file, not a pipe: a pipe would need draining while
    # the child runs.
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    started = time.perf_counter()
    child = subprocess.Popen(
        list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    watched = psutil.Process(child.pid)
    samples: list[Sample] = []
    peak = 0
    max_rss = 0
    try:
        while True:
            try:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                max_rss = usage.ru_maxrss * 1024
                if max_rss <= own_peak:
                    max_rss = 0
                break
            rss = _tree_rss(watched)
            peak = max(peak, rss)
            samples.append(
                Sample(
                    time.perf_counter() - started,
                    rss,
                    _decompressed_so_far(progress_dir),
                )
            )
            time.sleep(SAMPLE_SECS)
        wall = time.perf_counter() - started
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()
        log.seek(0, os.SEEK_END)
        size = log.tell()
        log.seek(max(0, size - 8000))
        output = log.read()
        log.close()
    return Measurement(
        command=list(command),
        returncode=child.returncode,
        wall_secs=wall,
        cpu_secs=_children_cpu() - cpu_before,
        peak_rss=max(peak, max_rss),
        max_process_rss=max_rss,
        samples=samples,
        output_tail=output.decode("utf-8", errors="replace"),
    )
