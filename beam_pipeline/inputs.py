"""Matching the input patterns and checking the output, before any work."""

from __future__ import annotations

import os
import stat
import uuid

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.options import OptionError
from transforms.reader import ArchiveSpec

__all__ = ["SUPPORTED_SUFFIXES", "check_output", "match_archives"]

SUPPORTED_SUFFIXES = (".zst", ".ndjson", ".jsonl", ".json")


def _literal_file(pattern: str) -> list[tuple[str, int]]:
    """The pattern as the name of one existing file, if it is one.

    A name such as ``RC_[1].zst`` is also a glob that does not match itself.
    """
    if "://" in pattern:
        if FileSystems.exists(pattern):
            with FileSystems.open(pattern) as handle:
                handle.seek(0, os.SEEK_END)
                return [(pattern, handle.tell())]
        return []
    if os.path.isfile(pattern):
        return [(os.path.abspath(pattern), os.path.getsize(pattern))]
    return []


def _inside(path: str, folder: str) -> bool:
    if "://" in path or "://" in folder:
        return path.startswith(folder.rstrip("/") + "/")
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def match_archives(patterns: list[str], output: str = "") -> list[ArchiveSpec]:
    """Every file the patterns match, sorted by path and numbered.

    Files under ``output`` are left out, so an output folder inside an input
    glob is never read as input; one file reached by two spellings or links
    is read once. Raises OptionError naming the first pattern that matches
    nothing, a file of an unsupported kind, or a local file that cannot be
    read.
    """
    paths: dict[str, int] = {}
    seen: set[str] = set()
    for pattern in patterns:
        if "://" not in pattern and os.path.isdir(pattern):
            raise OptionError(
                f"--input {pattern!r} is a folder; name the archives in it or a glob"
            )
        try:
            result = FileSystems.match([pattern])[0]
        except BeamIOError as exc:
            raise OptionError(
                f"--input {pattern!r} could not be listed: {exc}"
            ) from None
        matched = [
            (meta.path, meta.size_in_bytes)
            for meta in result.metadata_list
            if not meta.path.endswith("/")
        ] or _literal_file(pattern)
        matched = [
            (path, size)
            for path, size in matched
            if not (output and _inside(path, output))
        ]
        if not matched:
            raise OptionError(f"--input {pattern!r} matches no file")
        for path, size in matched:
            identity = path if "://" in path else os.path.realpath(path)
            if identity not in seen:
                seen.add(identity)
                paths[path] = size

    archives = []
    for archive_id, path in enumerate(sorted(paths)):
        if not path.lower().endswith(SUPPORTED_SUFFIXES):
            raise OptionError(
                f"--input {path!r} is neither a .zst archive nor a .ndjson/.jsonl file"
            )
        if "://" not in path:
            if os.path.isdir(path):
                raise OptionError(
                    f"--input {path!r} is a folder; name the archives in it or a glob"
                )
            if not stat.S_ISREG(os.stat(path).st_mode):
                # A FIFO or a device would block the reader or never end.
                raise OptionError(f"--input {path!r} is not a regular file")
            if not os.access(path, os.R_OK):
                raise OptionError(f"--input {path!r} cannot be read: permission denied")
        archives.append(ArchiveSpec(archive_id, path, paths[path]))
    return archives


def check_output(output: str) -> None:
    """Raises OptionError unless a file can be written under ``output``."""
    probe = FileSystems.join(output, f"_probe-{uuid.uuid4().hex}")
    try:
        if "://" not in output:
            if os.path.exists(output) and not os.path.isdir(output):
                raise OptionError(f"--output {output!r} is a file, not a folder")
            os.makedirs(output, exist_ok=True)
        with FileSystems.create(probe) as handle:
            handle.write(b"")
        FileSystems.delete([probe])
    except OptionError:
        raise
    except (OSError, BeamIOError) as exc:
        raise OptionError(f"--output {output!r} cannot be written: {exc}") from None
