"""Parsing, filtering and keying of records, one block of lines at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator

import apache_beam as beam
import orjson

from transforms import metrics
from transforms.files import Ledger, read_positions
from transforms.positions import OFFSET_BITS, archive_of, global_position, offset_of
from transforms.reader import (
    DEAD_LETTER_PREVIEW_BYTES,
    DEAD_LETTER_TAG,
    DeadLetter,
    LineBlock,
)

__all__ = [
    "BATCH_KEYS",
    "ParseRecords",
    "RecordFilter",
    "archive_of",
    "global_position",
    "offset_of",
    "parse_created_utc",
]

_LOGGER = logging.getLogger(__name__)

BATCH_KEYS = ("subreddit", "author", "none")


# A ledger row: archive, start, end, matches, dead letters, flags, then the
# offsets of the matches and of the dead letters.
LEDGER_FIELDS = 6
LEDGER_EOF = 1

_BOM = b"\xef\xbb\xbf"
# JSON's names for what a line that is not an object holds.
_JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
# Keys of records whose key field is missing, empty or not a string. A name
# is keyed in lower case, which never holds an ASCII capital, so these keys
# stay apart from every name, "_missing" and "5" included.
_MISSING_KEY = "_MISSING"


@dataclasses.dataclass(frozen=True)
class ResumeFiles:
    """Where parsing notes its progress and finds what a resumed run skips."""

    output: str
    ledger_dir: str
    skip_path: str


def parse_created_utc(value: object) -> float | None:
    """Epoch seconds from an int, a float or a numeric string; else None.

    NaN and infinities are None too: NaN would pass every time bound. So is
    a string Python reads as a number and JSON would not, such as "1_000".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str) and "_" in value:
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        # Not a number, or an integer too large for a double.
        return None
    return seconds if math.isfinite(seconds) else None


@dataclasses.dataclass(frozen=True)
class RecordFilter:
    """Which records match, what of them is kept, and how they are keyed.

    Subreddit and author names compare case-insensitively, as Reddit
    treats them. ``since`` is inclusive and ``until`` exclusive, in epoch
    seconds of ``created_utc``.
    """

    subreddits: frozenset[str] = frozenset()
    authors: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None
    fields: tuple[str, ...] = ()
    batch_key: str = "subreddit"
    num_shards: int = 16
    max_record_bytes: int = 64 * 2**20

    def selects_all(self) -> bool:
        """Whether every record matches, so that ``matches`` need not be asked."""
        return (
            not self.subreddits
            and not self.authors
            and self.since is None
            and self.until is None
        )

    def matches(self, record: dict) -> bool:
        if self.subreddits:
            name = record.get("subreddit")
            if not isinstance(name, str) or name.lower() not in self.subreddits:
                return False
        if self.authors:
            name = record.get("author")
            if not isinstance(name, str) or name.lower() not in self.authors:
                return False
        if self.since is not None or self.until is not None:
            created = parse_created_utc(record.get("created_utc"))
            if created is None:
                return False
            if self.since is not None and created < self.since:
                return False
            if self.until is not None and created >= self.until:
                return False
        return True

    def key_of(self, record: dict, position: int) -> str:
        if self.batch_key == "none":
            return f"shard-{position % self.num_shards:03d}"
        value = record.get(self.batch_key)
        if isinstance(value, str):
            return value.lower() if value else _MISSING_KEY
        if value is None:
            return _MISSING_KEY
        return _typed_key(value)


def _typed_key(value: object) -> str:
    """The batch key of a key field that holds a number, a bool or a container."""
    kind = type(value).__name__.upper()
    if isinstance(value, (bool, int, float)):
        return f"_{kind}:{value!r}"
    text = repr(value).encode("utf-8", "surrogatepass")
    return f"_{kind}:{hashlib.sha256(text).hexdigest()[:16]}"


def _strict_json(text: str) -> object:
    """Parses with the standard library, refusing NaN and Infinity."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


_SURROGATES = re.compile("[\ud800-\udfff]")
# The JSON escape of a surrogate; the standard library keeps a lone one as
# a code point that no UTF-8 encoder (nor Beam's string coder) accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Integer literals this long may lie beyond the 64 bits orjson holds
# exactly; it reads them as floats.
_LONG_NUMBER = re.compile(rb"\d{19}")
# Values that may hold such a number: a float, or containers of any value.
_INEXACT_TYPES = (float, dict, list)


def _portable(value: object, finite: bool) -> tuple[object, int]:
    """A parsed value that any JSON encoder takes, and how many parts changed.

    Lone surrogates become U+FFFD; with ``finite``, numbers beyond a double
    (read as infinity) become null, as orjson writes them.
    """
    changed = 0

    def clean(item: object) -> object:
        nonlocal changed
        if isinstance(item, str):
            cleaned, count = _SURROGATES.subn("\ufffd", item)
            changed += count
            return cleaned
        if isinstance(item, dict):
            return {clean(key): clean(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [clean(inner) for inner in item]
        if finite and isinstance(item, float) and not math.isfinite(item):
            changed += 1
            return None
        return item

    return clean(value), changed


def _project(record: dict, line: bytes, fields: tuple[str, ...]) -> bytes:
    """The selected fields of a record as one JSON line, numbers exact.

    orjson serialises almost every record. A line with a long digit run may
    hold an integer beyond 64 bits, which orjson read as a float and the
    standard library reads exactly, so such a line is parsed again.
    """
    selected = {name: record[name] for name in fields if name in record}
    # Only a float can be an integer that lost digits; most selections hold
    # none, and the search of the whole line costs more than parsing it.
    try:
        if not any(type(value) in _INEXACT_TYPES for value in selected.values()):
            return orjson.dumps(selected)
        if _LONG_NUMBER.search(line) is None:
            return orjson.dumps(selected)
    except TypeError:
        pass  # an integer beyond 64 bits, read by the standard library
    try:
        exact = _strict_json(line.decode("utf-8", errors="replace"))
        if type(exact) is not dict:
            return orjson.dumps(selected)
        chosen = {name: exact[name] for name in fields if name in exact}
        chosen, _ = _portable(chosen, finite=True)
    except (ValueError, RecursionError):
        return orjson.dumps(selected)
    return json.dumps(chosen, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class ParseRecords(beam.DoFn):
    """Parses each line of a block, filters it and keys the matches.

    Emits (key, (global position, line)) for each match, the line byte for
    byte as read unless fields are selected. Lines that are not JSON
    objects go to the ``dead_letter`` output with their offset and reason.
    """

    def __init__(
        self,
        record_filter: RecordFilter,
        archive_names: dict[int, str],
        resume: ResumeFiles | None = None,
    ) -> None:
        self._filter = record_filter
        self._names = archive_names
        self._resume = resume

    def setup(self) -> None:
        resume = self._resume
        self._skip = read_positions(resume.skip_path) if resume else frozenset()
        self._ledger = (
            Ledger(resume.output, resume.ledger_dir, LEDGER_FIELDS) if resume else None
        )

    def finish_bundle(self) -> None:
        if self._ledger is not None:
            self._ledger.flush()

    def teardown(self) -> None:
        if self._ledger is not None:
            self._ledger.flush()

    def process(self, block: LineBlock) -> Iterator:
        archive_id, offset, data = block
        if not data:
            # The reader's marker that this archive ended here.
            if self._ledger is not None:
                self._ledger.add(archive_id, offset, offset, 0, 0, LEDGER_EOF)
            return
        record_filter = self._filter
        fields = record_filter.fields
        max_record = record_filter.max_record_bytes
        matches = None if record_filter.selects_all() else record_filter.matches
        key_of = record_filter.key_of
        loads = orjson.loads
        skip = self._skip
        base = archive_id << OFFSET_BITS
        read = matched = dead = skipped = 0
        matched_at: list[int] = []
        dead_at: list[int] = []

        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        # Checks that no line of the block can need are left out of the loop,
        # which runs once a record: a carriage return, a line over the limit.
        rare = b"\r" in data or len(data) > max_record
        position = offset
        for line in lines:
            line_offset = position
            position += len(line) + 1
            problem = None
            if rare:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > max_record:
                    metrics.OVERSIZED_RECORDS.inc()
                    problem = f"record of {len(line)} bytes exceeds --max_record_bytes ({max_record})"
            if problem is None:
                try:
                    record = loads(line)
                except orjson.JSONDecodeError as exc:
                    if not line.strip():
                        metrics.BLANK_LINES.inc()
                        continue
                    record, line, problem = self._parse_slowly(line, exc)
                if problem is None and type(record) is not dict:
                    problem = (
                        f"JSON {_JSON_TYPES.get(type(record), 'value')}, not an object"
                    )
            if problem is not None:
                dead += 1
                dead_at.append(line_offset)
                if not skip or (base | line_offset) not in skip:
                    yield self._dead(archive_id, line_offset, line, problem)
                continue
            read += 1
            if matches is not None and not matches(record):
                continue
            matched += 1
            matched_at.append(line_offset)
            global_pos = base | line_offset
            if skip and global_pos in skip:
                # Written by the run this one resumes.
                skipped += 1
                continue
            if fields:
                line = _project(record, line, fields)
            yield key_of(record, global_pos), (global_pos, line)

        metrics.RECORDS_READ.inc(read)
        metrics.RECORDS_MATCHED.inc(matched)
        archive = self._names.get(archive_id, str(archive_id))
        metrics.archive_counter("records_read", archive).inc(read)
        metrics.archive_counter("records_matched", archive).inc(matched)
        if skipped:
            metrics.RECORDS_SKIPPED_ON_RESUME.inc(skipped)
        if self._ledger is not None:
            self._ledger.add(
                archive_id,
                offset,
                offset + len(data),
                matched,
                dead,
                0,
                *matched_at,
                *dead_at,
            )

    def _parse_slowly(self, line: bytes, error: Exception):
        """Second chances for a line orjson refused.

        A byte-order mark is dropped. Bytes that are not UTF-8, and escapes
        of lone surrogates, reach the filters as U+FFFD while the line is
        written as it was read. The standard library parses what orjson
        cannot hold: numbers beyond a double (``1e999``), lone surrogates.

        Returns (record, line to write, problem); problem is None when the
        line is a usable record after all.
        """
        if line.startswith(_BOM):
            line = line[len(_BOM) :]
            try:
                return orjson.loads(line), line, None
            except orjson.JSONDecodeError as exc:
                error = exc
        try:
            text = line.decode("utf-8")
            invalid = False
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            invalid = True
        if invalid:
            try:
                record = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                error = exc
            else:
                metrics.INVALID_UTF8_RECORDS.inc()
                return record, line, None
        try:
            record = _strict_json(text)
            if _SURROGATE_ESCAPE.search(text):
                record, replaced = _portable(record, finite=False)
                invalid = invalid or replaced > 0
        except RecursionError:
            return None, line, "JSON nested too deeply to parse"
        except ValueError:
            return None, line, f"not valid JSON: {error}"
        if invalid:
            metrics.INVALID_UTF8_RECORDS.inc()
        return record, line, None

    def _dead(self, archive_id: int, offset: int, line: bytes, reason: str):
        metrics.DEAD_LETTERS.inc()
        return beam.pvalue.TaggedOutput(
            DEAD_LETTER_TAG,
            DeadLetter(
                self._names.get(archive_id, str(archive_id)),
                offset,
                reason,
                line[:DEAD_LETTER_PREVIEW_BYTES],
                len(line),
            ),
        )
