"""Running the job in tests and reading back what it wrote."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import orjson
import zstandard
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline.cli import prepare, run_job
from transforms.zstd_frames import MAX_WINDOW_SIZE

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.path.normpath(os.path.join(PROJECT_ROOT, "..", "shared", "data", "real"))


def real_sample(name: str) -> str:
    return os.path.join(REAL_DATA, name)


def decompress_file(path: str) -> bytes:
    """The whole decompressed content of a small archive (tests only)."""
    with open(path, "rb") as handle:
        if not path.endswith(".zst"):
            return handle.read()
        reader = zstandard.ZstdDecompressor(
            max_window_size=MAX_WINDOW_SIZE
        ).stream_reader(handle, read_across_frames=True)
        return reader.read()


def archive_lines(path: str) -> list[tuple[int, bytes]]:
    """(offset, line) of every line of an archive, computed without the job."""
    data = decompress_file(path)
    result = []
    offset = 0
    for line in data.split(b"\n"):
        if line or offset < len(data):
            result.append((offset, line))
        offset += len(line) + 1
    if result and result[-1][1] == b"" and data.endswith(b"\n"):
        result.pop()
    return result


def run(arguments: Sequence[str], show_progress: bool = False) -> dict:
    """Runs the job in this process and returns its summary."""
    options = PipelineOptions(list(arguments))
    plan = prepare(options)
    return run_job(options, plan, show_progress=show_progress)


def _cli_environment(env: dict | None) -> dict:
    environment = dict(os.environ, NO_GCE_CHECK="true", PYTHONUNBUFFERED="1")
    environment.update(env or {})
    return environment


def run_cli(arguments: Sequence[str], timeout: float = 600, env: dict | None = None):
    """Runs ``python -m beam_pipeline`` as a user would; returns the process."""
    return subprocess.run(
        [sys.executable, "-m", "beam_pipeline", *arguments],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_cli_environment(env),
    )


def start_cli(
    arguments: Sequence[str], env: dict | None = None, **options
) -> subprocess.Popen:
    """Starts ``python -m beam_pipeline`` as ``run_cli`` does, without waiting.

    Output is piped as text unless ``options`` (passed to ``Popen``) say
    otherwise.
    """
    options = {
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
        **options,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "beam_pipeline", *arguments],
        cwd=PROJECT_ROOT,
        env=_cli_environment(env),
        **options,
    )


def batch_files(output: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output, "batches", "*.jsonl.zst")))


def read_batches(output: str) -> dict[str, list[bytes]]:
    """Each batch file's record lines, by file name."""
    batches = {}
    for path in batch_files(output):
        data = decompress_file(path)
        assert data.endswith(b"\n"), path
        batches[os.path.basename(path)] = data[:-1].split(b"\n")
    return batches


def written_records(output: str) -> list[bytes]:
    return [line for lines in read_batches(output).values() for line in lines]


def dead_letters(output: str) -> list[dict]:
    letters = []
    for path in sorted(glob.glob(os.path.join(output, "dead_letter", "*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            letters.extend(json.loads(line) for line in handle if line.strip())
    return sorted(letters, key=lambda letter: (letter["archive"], letter["offset"]))


def summary(output: str) -> dict:
    with open(os.path.join(output, "_summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def parse(line: bytes) -> dict:
    return orjson.loads(line)
