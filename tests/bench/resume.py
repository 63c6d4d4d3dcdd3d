"""What a resume saves: a full run against a run killed half-way and resumed.

    python -m tests.bench.resume [--size 1GB]

Generates one single-frame archive, times an uninterrupted full job on it,
then starts the same job on a fresh output, kills its process group with
SIGKILL at half the uninterrupted time, and times the rerun that resumes
it. Prints both times and their ratio, and checks that the resumed output
holds every record exactly once.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from beam_pipeline.synth import SynthSpec, generate, parse_size
from tests.helpers import PROJECT_ROOT, archive_lines, read_batches

__all__ = ["measure_resume"]


def _command(archive: str, output: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "beam_pipeline",
        f"--input={archive}",
        f"--output={output}",
        "--batch_size=1000",
    ]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, NO_GCE_CHECK="true"),
        start_new_session=True,
    )


def _timed(command: list[str]) -> float:
    started = time.monotonic()
    process = _start(command)
    if process.wait() != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with status {process.returncode}"
        )
    return time.monotonic() - started


def measure_resume(archive: str, workdir: str) -> dict:
    """Times a full run and a resume after a kill at half of it."""
    full_output = os.path.join(workdir, "full")
    full_secs = _timed(_command(archive, full_output))

    output = os.path.join(workdir, "killed")
    process = _start(_command(archive, output))
    time.sleep(full_secs / 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    on_disk = sum(len(lines) for lines in read_batches(output).values())

    resume_secs = _timed(_command(archive, output))

    written = [line for lines in read_batches(output).values() for line in lines]
    expected = sorted(line for _, line in archive_lines(archive))
    doubled = sum(count - 1 for count in collections.Counter(written).values())
    exact = sorted(written) == expected
    return {
        "full_secs": round(full_secs, 2),
        "resume_secs": round(resume_secs, 2),
        "ratio": round(resume_secs / full_secs, 3),
        "records": len(expected),
        "records_on_disk_at_kill": on_disk,
        "doubled": doubled,
        "exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.resume", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--size", default="1GB", help="Decompressed size of the archive."
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="Folder for the archive and outputs (a temporary one by default).",
    )
    args = parser.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="resume-bench-")
    try:
        archive = os.path.join(workdir, "RC_2019-10.zst")
        generate(archive, SynthSpec(target_bytes=parse_size(args.size), subreddits=200))
        result = measure_resume(archive, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"full run {result['full_secs']:.1f} s; killed at half, resumed in"
        f" {result['resume_secs']:.1f} s: ratio {result['ratio']:.2f};"
        f" {result['records_on_disk_at_kill']:,} of {result['records']:,} records were on disk"
        f" at the kill; output exact: {result['exact']}, doubled: {result['doubled']}"
    )
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
