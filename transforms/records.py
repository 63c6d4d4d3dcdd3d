"""Parsing, filtering and keying of records, one block of lines at a time."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, Optional

import apache_beam as beam
import orjson

from transforms import metrics
from transforms.reader import DEAD_LETTER_PREVIEW_BYTES, DEAD_LETTER_TAG, DeadLetter, LineBlock

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

# A record's global position packs the archive number above its offset;
# 48 bits of offset cover 256 TiB of decompressed bytes per archive.
_OFFSET_BITS = 48
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1

_BOM = b"\xef\xbb\xbf"
_MISSING_KEY = "_missing"


def global_position(archive_id: int, offset: int) -> int:
    return (archive_id << _OFFSET_BITS) | offset


def archive_of(position: int) -> int:
    return position >> _OFFSET_BITS


def offset_of(position: int) -> int:
    return position & _OFFSET_MASK


def parse_created_utc(value: object) -> Optional[float]:
    """Epoch seconds from an int, a float or a numeric string; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclasses.dataclass(frozen=True)
class RecordFilter:
    """Which records match, what of them is kept, and how they are keyed.

    Subreddit and author names compare case-insensitively, as Reddit
    treats them. ``since`` is inclusive and ``until`` exclusive, in epoch
    seconds of ``created_utc``.
    """

    subreddits: frozenset[str] = frozenset()
    authors: frozenset[str] = frozenset()
    since: Optional[float] = None
    until: Optional[float] = None
    fields: tuple[str, ...] = ()
    batch_key: str = "subreddit"
    num_shards: int = 16
    max_record_bytes: int = 64 * 2**20

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
        return str(value)


def _strict_json(text: str) -> object:
    """Parses with the standard library, refusing NaN and Infinity."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


class ParseRecords(beam.DoFn):
    """Parses each line of a block, filters it and keys the matches.

    Emits (key, (global position, line)) for each match, the line byte for
    byte as read unless fields are selected. Lines that are not JSON
    objects go to the ``dead_letter`` output with their offset and reason.
    """

    def __init__(self, record_filter: RecordFilter, archive_names: dict[int, str]) -> None:
        self._filter = record_filter
        self._names = archive_names

    def process(self, block: LineBlock) -> Iterator:
        archive_id, offset, data = block
        record_filter = self._filter
        fields = record_filter.fields
        max_record = record_filter.max_record_bytes
        matches = record_filter.matches
        key_of = record_filter.key_of
        loads = orjson.loads
        base = archive_id << _OFFSET_BITS
        read = matched = 0

        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        position = offset
        for line in lines:
            line_offset = position
            position += len(line) + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > max_record:
                yield self._dead(archive_id, line_offset, line, f"record of {len(line)} bytes exceeds --max_record_bytes ({max_record})")
                continue
            try:
                record = loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip():
                    metrics.BLANK_LINES.inc()
                    continue
                record, line, problem = self._parse_slowly(line, exc)
                if problem is not None:
                    yield self._dead(archive_id, line_offset, line, problem)
                    continue
            if type(record) is not dict:
                yield self._dead(archive_id, line_offset, line, f"JSON {type(record).__name__}, not an object")
                continue
            read += 1
            if not matches(record):
                continue
            matched += 1
            global_pos = base | line_offset
            if fields:
                line = orjson.dumps({name: record[name] for name in fields if name in record})
            yield key_of(record, global_pos), (global_pos, line)

        metrics.RECORDS_READ.inc(read)
        metrics.RECORDS_MATCHED.inc(matched)

    def _parse_slowly(self, line: bytes, error: Exception):
        """Second chances for a line orjson refused: BOM, bad UTF-8, big ints.

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
            invalid_utf8 = False
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            invalid_utf8 = True
        try:
            record = orjson.loads(text) if invalid_utf8 else _strict_json(text)
        except RecursionError:
            return None, line, "JSON nested too deeply to parse"
        except (ValueError, orjson.JSONDecodeError):
            if invalid_utf8:
                try:
                    record = _strict_json(text)
                except (ValueError, RecursionError):
                    return None, line, f"not valid JSON: {error}"
            else:
                return None, line, f"not valid JSON: {error}"
        if invalid_utf8:
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
