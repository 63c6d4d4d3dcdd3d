"""The name prefilter: lines that cannot match are passed over, and no match is lost."""

from __future__ import annotations

import collections
import json
import random

import pytest
import zstandard

from tests.helpers import archive_lines, dead_letters, real_sample, run, written_records
from transforms.records import NamePrefilter, RecordFilter

KELVIN = "\u212a"

# Spellings of a record of AskMen, and of records that are not, that a
# search of the raw bytes could get wrong in either direction.
MATCHING = [
    b'{"subreddit":"AskMen","id":"plain"}',
    b'{"subreddit":"askmen","id":"lower"}',
    b'{"subreddit":"ASKMEN","id":"upper"}',
    b'{"subreddit":"\\u0041sk\\u004Den","id":"escaped letters"}',
    f'{{"subreddit":"As{KELVIN}Men","id":"kelvin sign"}}'.encode(),
    b'{"subreddit":"As\\u212aMen","id":"escaped kelvin sign"}',
    b'{"subreddit" : "AskMen","id":"spaces around the colon"}',
    b'{"subreddit":"x","subreddit":"AskMen","id":"the last of two keys"}',
    b'\xef\xbb\xbf{"subreddit":"AskMen","id":"byte-order mark"}',
    b'{"subreddit":"AskMen","id":"not utf-8","body":"caf\xe9"}',
    b'{"sub\\u0072eddit":"AskMen","id":"escaped key"}',
]
NOT_MATCHING = [
    b'{"id":"named in the body","body":"ask on AskMen","subreddit":"AskWomen"}',
    b'{"id":"quoted in the body","body":"\\"AskMen\\"","subreddit":"x"}',
    b'{"id":"nested","parent":{"subreddit":"AskMen"},"subreddit":"x"}',
    b'{"subreddit":"AskMen","id":"the first of two keys","subreddit":"x"}',
    b'{"subreddit":"AskMen ","id":"trailing space"}',
    b'{"subreddit":"AskMenX","id":"longer name"}',
    b'{"subreddit":"Ask\\nMen","id":"an escape that is no letter"}',
]
# Not records: each is a dead letter when parsed, and only the first three
# hold the name.
BROKEN_WITH_NAME = [b'["AskMen"]', b'{"subreddit":"AskMen",', b'{"subreddit":"AskMen']
BROKEN_WITHOUT_NAME = [b"not json at all", b'{"subreddit":"x"']


def _spans_lines(block: bytes, names: list[str]) -> list[bytes] | None:
    spans = NamePrefilter(names).spans(block)
    return None if spans is None else [block[start:end] for start, end in spans]


def test_only_lines_holding_a_quoted_name_are_chosen():
    lines = [
        b'{"subreddit":"AskMen","id":1}',
        b'{"subreddit":"pics","body":"ask in AskMen"}',
        b"",
        b'{"subreddit":"askwomen","id":2}',
        b'{"author":"x","subreddit":"ASKMEN"}',
    ]
    block = b"\n".join(lines)

    chosen = _spans_lines(block, ["askmen", "askwomen"])

    assert chosen == [lines[0], lines[3], lines[4]]


def test_a_line_is_chosen_once_however_often_it_names_one():
    line = b'{"subreddit":"AskMen","title":"\\"x\\"","other":"askmen","n":"askwomen"}'

    assert _spans_lines(line + b"\n" + line + b"\n", ["askmen", "askwomen"]) == [
        line,
        line,
    ]


def test_a_block_with_an_escaped_letter_is_parsed_whole():
    block = b'{"subreddit":"pics"}\n{"subreddit":"\\u0061skmen"}\n'

    assert NamePrefilter(["askmen"]).spans(block) is None


def test_escapes_that_spell_no_name_character_keep_the_search():
    block = b'{"subreddit":"pics","body":"\\ud83d\\ude00 \\u00e9 \\u0026 \\n"}\n'

    assert NamePrefilter(["askmen"]).spans(block) == []


def test_a_record_cut_short_after_the_name_is_chosen():
    line = b'{"id":"x","subreddit":"AskMen'

    assert _spans_lines(line, ["askmen"]) == [line]


@pytest.mark.parametrize(
    "names, found",
    [
        (["askmen", "askwomen"], [0, 1]),
        (["ask"], [0, 1, 2]),
        (["ask", "askmen"], [0, 1, 2]),
        (["bob", "askwomen", "k"], [1, 3, 4]),
    ],
)
def test_names_sharing_letters_are_all_found(names, found):
    lines = [
        b'{"subreddit":"AskMen"}',
        b'{"subreddit":"askwomen"}',
        b'{"subreddit":"Ask"}',
        b'{"author":"BOB"}',
        b'{"author":"K"}',
        b'{"author":"ob"}',
    ]

    chosen = _spans_lines(b"\n".join(lines), names)

    assert chosen == [lines[index] for index in found]


def test_the_kelvin_sign_is_searched_for_in_place_of_k():
    line = f'{{"subreddit":"AS{KELVIN}MEN"}}'.encode()

    assert _spans_lines(line, ["askmen"]) == [line]
    assert _spans_lines(line, ["asxmen"]) == []


@pytest.mark.parametrize(
    "record_filter, prefilters",
    [
        (RecordFilter(), 0),
        (RecordFilter(subreddits=frozenset({"askmen"})), 1),
        (
            RecordFilter(subreddits=frozenset({"askmen"}), authors=frozenset({"bob"})),
            2,
        ),
        # Names holding characters that JSON may escape in other ways, or
        # that other characters lower-case to, are left to the parser.
        (RecordFilter(subreddits=frozenset({"caf\u00e9"})), 0),
        (RecordFilter(authors=frozenset({"[deleted]"})), 0),
        (RecordFilter(subreddits=frozenset({"a/b", "askmen"})), 0),
        (
            RecordFilter(
                subreddits=frozenset({"askmen"}),
                authors=frozenset({"[deleted]"}),
            ),
            1,
        ),
        (RecordFilter(subreddits=frozenset({"askmen"}), parse_all_lines=True), 0),
        # Many first letters cost the search what parsing costs.
        (RecordFilter(subreddits=frozenset({"a1", "b1", "c1", "d1", "e1", "f1"})), 1),
        (RecordFilter(subreddits=frozenset({"a", "b", "c", "d", "e", "f", "g"})), 0),
        (RecordFilter(subreddits=frozenset(f"ask{n}" for n in range(50))), 1),
    ],
)
def test_prefilters_are_made_only_where_the_search_is_exact(record_filter, prefilters):
    assert len(NamePrefilter.for_filter(record_filter)) == prefilters


def _hostile_archive(folder, seed: int) -> str:
    """The spellings above, shuffled among real submissions, a few of each."""
    rng = random.Random(seed)
    real = [
        line
        for _, line in archive_lines(real_sample("AskWomen_submissions_2019-10.zst"))
    ][:1500]
    special = (MATCHING + NOT_MATCHING + BROKEN_WITH_NAME + BROKEN_WITHOUT_NAME) * 3
    special += [b""] * 3
    lines = real + special
    rng.shuffle(lines)
    # The escaped spellings make their blocks parse whole; most blocks hold
    # none, so both ways of choosing lines are used.
    path = folder / "RS_2019-10.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return str(path)


def _expected_records(path: str, subreddit: str) -> list[bytes]:
    """Every record of the archive whose subreddit is ``subreddit``, by the standard library."""
    expected = []
    for _, line in archive_lines(path):
        try:
            record = json.loads(line.decode("utf-8", "replace").lstrip("\ufeff"))
        except ValueError:
            continue
        name = record.get("subreddit") if isinstance(record, dict) else None
        if isinstance(name, str) and name.lower() == subreddit:
            expected.append(line.removeprefix(b"\xef\xbb\xbf"))
    return expected


@pytest.mark.parametrize("seed", [1, 2])
def test_passing_lines_over_writes_what_parsing_every_line_writes(tmp_path, seed):
    archive = _hostile_archive(tmp_path, seed)
    common = [f"--input={archive}", "--subreddit=AskMen", "--block_bytes=4096"]

    fast = run([*common, f"--output={tmp_path / 'fast'}"])
    thorough = run([*common, f"--output={tmp_path / 'thorough'}", "--parse_all_lines"])

    expected = collections.Counter(_expected_records(archive, "askmen"))
    assert sum(expected.values()) == 3 * len(MATCHING)
    assert collections.Counter(written_records(str(tmp_path / "fast"))) == expected
    assert collections.Counter(written_records(str(tmp_path / "thorough"))) == expected

    # Parsing every line finds every broken one; passing lines over finds
    # those that hold the name, and counts the others as read.
    fast_letters = {letter["offset"] for letter in dead_letters(str(tmp_path / "fast"))}
    all_letters = {
        letter["offset"] for letter in dead_letters(str(tmp_path / "thorough"))
    }
    broken = len(BROKEN_WITH_NAME + BROKEN_WITHOUT_NAME) * 3
    assert len(all_letters) == thorough["dead_letters"] == broken
    named = {
        offset for offset, line in archive_lines(archive) if line in BROKEN_WITH_NAME
    }
    assert named <= fast_letters < all_letters
    # A broken line sharing a block with an escaped name is parsed too.
    assert (
        fast["records_read"] + fast["dead_letters"]
        == thorough["records_read"] + thorough["dead_letters"]
    )
    assert fast["blank_lines"] == thorough["blank_lines"] == 3
    assert fast["records_passed_over"] > 1000
    assert thorough["records_passed_over"] == 0


def test_author_and_subreddit_prefilters_both_hold(tmp_path):
    lines = [
        b'{"subreddit":"AskMen","author":"Bob","id":1}',
        b'{"subreddit":"AskMen","author":"alice","id":2}',
        b'{"subreddit":"pics","author":"bob","id":3}',
        b'{"subreddit":"askmen","author":"\\u0062ob","id":4}',
        b'{"subreddit":"AskMen","body":"bob","author":"carol","id":5}',
    ]
    archive = tmp_path / "RC_2019-10.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    output = str(tmp_path / "out")

    result = run(
        [
            f"--input={archive}",
            f"--output={output}",
            "--subreddit=askmen",
            "--author=BOB",
        ]
    )

    assert sorted(written_records(output)) == sorted([lines[0], lines[3]])
    assert result["records_read"] == len(lines)
