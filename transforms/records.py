"""Parsing, filtering and keying of records, one block of lines at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import operator
import re
from collections.abc import Iterable, Iterator
from itertools import accumulate, repeat

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
    "NamePrefilter",
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
    # Parse every line, even those a name filter shows cannot match.
    parse_all_lines: bool = False

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


# Names the prefilter can look for exactly: JSON writes each of these
# characters either as itself (in either case, for a letter) or as a \u00XX
# escape, and no other character lower-cases to one of them but the Kelvin
# sign (to "k").
_PLAIN_NAME = re.compile(r"[a-z0-9_-]+")
# Escapes that can stand for a character of a plain name; a block holding
# one is parsed whole. The Kelvin sign, as UTF-8, is searched for in place
# of "k".
_NAME_ESCAPE = re.compile(rb"\\u(?:00(?:2[dD]|3[0-9]|[4-7][0-9a-fA-F])|212[aA])")
_KELVIN_SIGN = "\u212a".encode()
# The search tries every first letter of the names at each quote of the
# block: with more than this many it costs about what parsing every line
# does (measured on 1 MiB blocks of comments), and lines are parsed instead.
PREFILTER_MAX_FIRST_LETTERS = 6


class NamePrefilter:
    """Finds the lines of a block that can hold one of some names as a JSON string.

    A record whose subreddit (or author) lower-cases to a wanted name holds
    a quote and that name in its raw bytes, unless the name is spelt with
    escapes or the Kelvin sign; lines holding neither the quoted name (in
    any case) nor such a spelling cannot match and need not be parsed. The
    closing quote is not asked for, so that a record cut short just after
    the name is parsed and reported. The search runs over the whole block
    in C, where parsing costs a call per line; on a selective job most
    lines are never parsed.
    """

    def __init__(self, names: Iterable[str]) -> None:
        names = sorted(names)
        if not self.can_search(names):
            raise ValueError(f"names the prefilter cannot look for exactly: {names}")
        self._quoted = re.compile(b'"' + _trie_pattern(names), re.IGNORECASE)

    @staticmethod
    def can_search(names: Iterable[str]) -> bool:
        """Whether the names are plain, and few enough first letters to pay."""
        names = list(names)
        return (
            bool(names)
            and all(_PLAIN_NAME.fullmatch(name) for name in names)
            and len({name[0] for name in names}) <= PREFILTER_MAX_FIRST_LETTERS
        )

    @classmethod
    def for_filter(cls, record_filter: RecordFilter) -> list[NamePrefilter]:
        """One prefilter per name filter it can narrow; empty when none can."""
        if record_filter.parse_all_lines:
            return []
        return [
            cls(names)
            for names in (record_filter.subreddits, record_filter.authors)
            if cls.can_search(names)
        ]

    def spans(self, data: bytes) -> list[tuple[int, int]] | None:
        """(start, end) of each line of ``data`` that may match, in order.

        None when every line may: the block spells some character of a name
        in a way the search does not follow.
        """
        if _NAME_ESCAPE.search(data) is not None:
            return None
        spans = []
        search = self._quoted.search
        find = data.find
        rfind = data.rfind
        position = 0
        while (hit := search(data, position)) is not None:
            at = hit.start()
            start = rfind(b"\n", 0, at) + 1
            end = find(b"\n", at)
            if end < 0:
                end = len(data)
            spans.append((start, end))
            position = end + 1
        return spans


def _trie_pattern(names: list[str]) -> bytes:
    """A regular expression for any of the names, branching letter by letter.

    A branch per name would make the search try each at every quote; a
    branch per distinct next letter tries each letter once. A name that
    another name begins with stands for both, since the search needs no
    end of name.
    """
    kept: list[str] = []
    for name in sorted(names):
        if not kept or not name.startswith(kept[-1]):
            kept.append(name)

    def letter(char: str) -> bytes:
        escaped = re.escape(char.encode("ascii"))
        return b"(?:k|" + re.escape(_KELVIN_SIGN) + b")" if char == "k" else escaped

    def branch(group: list[str], depth: int) -> bytes:
        by_letter: dict[str, list[str]] = {}
        for name in group:
            if len(name) > depth:
                by_letter.setdefault(name[depth], []).append(name)
        if not by_letter:
            return b""
        parts = [
            letter(char) + branch(rest, depth + 1) for char, rest in by_letter.items()
        ]
        return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"

    return branch(kept, 0)


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

    Emits, for each block that has matches, one list of (key, (global
    position, line)), the line byte for byte as read unless fields are
    selected: a list a block costs the runner one element where a record
    each would cost it one a record. Lines that are not JSON objects go to
    the ``dead_letter`` output with their offset and reason.
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
        self._prefilters = NamePrefilter.for_filter(self._filter)
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
        keyed: list[tuple[str, tuple[int, bytes]]] = []
        keep = keyed.append

        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        # Checks that no line of the block can need are left out of the loop,
        # which runs once a record: a carriage return, a line over the limit.
        rare = b"\r" in data or len(data) > max_record
        spans = None if rare else self._candidate_spans(data)
        if spans is None:
            starts = accumulate(
                map(operator.add, map(len, lines), repeat(1)), initial=offset
            )
            # One start more than lines: the last is where the block ends.
            numbered = zip(starts, lines, strict=False)
        else:
            # Lines that cannot match are counted as read, and left unparsed.
            blank = lines.count(b"")
            passed_over = len(lines) - blank - len(spans)
            read += passed_over
            if blank:
                metrics.BLANK_LINES.inc(blank)
            if passed_over:
                metrics.RECORDS_PASSED_OVER.inc(passed_over)
            numbered = ((offset + start, data[start:end]) for start, end in spans)
        for line_offset, line in numbered:
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
            keep((key_of(record, global_pos), (global_pos, line)))

        if keyed:
            yield keyed
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

    def _candidate_spans(self, data: bytes) -> list[tuple[int, int]] | None:
        """The lines of a block the name filters leave to parse; None for all."""
        if not self._prefilters:
            return None
        chosen = None
        for prefilter in self._prefilters:
            spans = prefilter.spans(data)
            if spans is None:
                continue
            chosen = spans if chosen is None else sorted(set(chosen) & set(spans))
        return chosen

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
