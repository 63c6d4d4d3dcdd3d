"""Synthetic Pushshift-like archives of any size, fast and reproducible.

Records carry the real field sets of comments and submissions and drift as
the real files do with the year: ``created_utc`` is a string in 2007-2015
files, an int in most others and a float in 2024; key order varies from
line to line before 2023-04 and is sorted after; old files escape all
non-ASCII text, newer ones carry raw UTF-8. Body lengths are mostly short
with a long tail to tens of thousands of characters, and subreddits follow
a Zipf-like spread. The archive is one ``--long=31`` frame with no stored
content size, like the dumps, or a seekable multi-frame file.

    python -m beam_pipeline.synth OUT.zst --size 1GB --kind comments --month 2019-10
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import orjson
import zstandard

from beam_pipeline.seekable import SeekableWriter

__all__ = ["SynthSpec", "generate", "main", "parse_size", "record_lines"]

_WORDS = (
    "the of and to a in is it you that was for on are with as I his they be at one have this"
    " from or had by word but what some we can out other were all there when up use your how"
    " said an each she which do their time if will way about many then them write would like"
    " so these her long make thing see him two has look more day could go come did number"
    " sound no most people my over know water than call first who may down side been now find"
    " reddit thread post upvote karma mod edit source link comment lol deleted removed"
).split()
_NON_ASCII = [
    "café",
    "naïve",
    "Straße",
    "日本語",
    "emoji 😀",
    "Ελληνικά",
    "русский",
    "€100",
    "—",
    "…",
]
_SUBREDDIT_BASE = [
    "AskReddit",
    "funny",
    "pics",
    "politics",
    "worldnews",
    "gaming",
    "news",
    "todayilearned",
    "AskMen",
    "AskWomen",
    "science",
    "movies",
    "videos",
    "technology",
    "programming",
    "reddit.com",
    "books",
    "Music",
    "nba",
    "soccer",
    "europe",
    "de",
    "france",
    "japan",
]


def parse_size(text: str) -> int:
    """Bytes from '500', '64KB', '1.5GB' (decimal) or '2GiB' (binary)."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    number = text.strip().lower()
    suffix = number.lstrip("0123456789.")
    value = number[: len(number) - len(suffix)]
    if suffix not in units or not value:
        raise ValueError(f"not a size: {text!r}")
    return int(float(value) * units[suffix])


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """What to generate."""

    kind: str = "comments"
    month: str = "2019-10"
    target_bytes: int = 10 * 10**6
    records: int | None = None
    seed: int = 1
    subreddits: int = 2000


class _Pools:
    """Pre-drawn names and bodies, so each record costs a few choices."""

    def __init__(self, spec: SynthSpec, rng: random.Random) -> None:
        self.subreddits = list(_SUBREDDIT_BASE) + [
            f"sub_{i:05d}" for i in range(spec.subreddits)
        ]
        # Zipf-like weights: a few giants, a long tail.
        self.subreddit_weights = [
            1.0 / (rank + 1) ** 1.1 for rank in range(len(self.subreddits))
        ]
        self.authors = ["[deleted]", "AutoModerator"] + [
            f"user_{rng.getrandbits(40):010x}" for _ in range(20000)
        ]
        self.author_weights = [30.0, 5.0] + [1.0] * 20000
        self.bodies = [self._body(rng, spec) for _ in range(4000)]

    @staticmethod
    def _body(rng: random.Random, spec: SynthSpec) -> str:
        roll = rng.random()
        if roll < 0.02:
            length = rng.randint(5000, 40000)
        elif roll < 0.15:
            length = rng.randint(300, 3000)
        else:
            length = int(rng.lognormvariate(4.0, 0.9)) + 1
        words = []
        size = 0
        while size < length:
            word = rng.choice(_NON_ASCII) if rng.random() < 0.01 else rng.choice(_WORDS)
            words.append(word)
            size += len(word) + 1
        text = " ".join(words)
        if rng.random() < 0.1:
            text = text.replace(" ", "\n\n", 1)
        if rng.random() < 0.005:
            text = "[deleted]"
        return text


def _layout(month: str) -> tuple[str, bool, bool]:
    """(created_utc type, sorted keys, escape non-ASCII) for a month."""
    year, number = (int(part) for part in month.split("-"))
    if 2007 <= year <= 2015:
        created = "str"
    elif year >= 2024:
        created = "float"
    else:
        created = "int"
    sorted_keys = (year, number) >= (2023, 4)
    escape = year < 2017
    return created, sorted_keys, escape


def _month_start(month: str) -> int:
    year, number = (int(part) for part in month.split("-"))
    return int(
        datetime.datetime(year, number, 1, tzinfo=datetime.timezone.utc).timestamp()
    )


def record_lines(spec: SynthSpec) -> Iterator[bytes]:
    """Yields record lines, newline included, until the size or count is met."""
    rng = random.Random(spec.seed)
    pools = _Pools(spec, rng)
    created_type, sorted_keys, escape = _layout(spec.month)
    start = _month_start(spec.month)
    encoded_bodies = [
        json.dumps(body, ensure_ascii=True).encode("ascii")
        if escape
        else orjson.dumps(body)
        for body in pools.bodies
    ]
    # Key order draws from its own generator, so that the same seed gives
    # the same records in every layout.
    order_rng = random.Random(spec.seed + 1)
    key_orders = None
    produced = count = 0
    chunk = 4096
    while True:
        subreddits = rng.choices(
            range(len(pools.subreddits)), pools.subreddit_weights, k=chunk
        )
        authors = rng.choices(pools.authors, pools.author_weights, k=chunk)
        bodies = rng.choices(range(len(encoded_bodies)), k=chunk)
        for position in range(chunk):
            sub_index = subreddits[position]
            created = start + rng.randrange(28 * 86400)
            record = _record(
                spec.kind,
                rng,
                pools.subreddits[sub_index],
                sub_index,
                authors[position],
                created,
                created_type,
            )
            if sorted_keys:
                record = dict(sorted(record.items()))
            else:
                if key_orders is None:
                    keys = list(record)
                    key_orders = [
                        order_rng.sample(keys, len(keys)) for _ in range(8)
                    ] + [keys]
                order = key_orders[order_rng.randrange(len(key_orders))]
                record = {key: record[key] for key in order if key in record}
            line = (
                orjson.dumps(record).replace(
                    b'"\\u0000BODY"', encoded_bodies[bodies[position]]
                )
                + b"\n"
            )
            produced += len(line)
            count += 1
            yield line
            if spec.records is not None:
                if count >= spec.records:
                    return
            elif produced >= spec.target_bytes:
                return


def _record(
    kind: str,
    rng: random.Random,
    subreddit: str,
    sub_index: int,
    author: str,
    created: int,
    created_type: str,
) -> dict:
    created_value = (
        str(created)
        if created_type == "str"
        else (float(created) if created_type == "float" else created)
    )
    item_id = f"{rng.getrandbits(36):x}"
    edited = (
        False
        if rng.random() < 0.95
        else (created + rng.randrange(3600) if rng.random() < 0.97 else True)
    )
    score = rng.randint(-20, 5000) if rng.random() < 0.99 else None
    common = {
        "author": author,
        "author_flair_css_class": None,
        "author_flair_text": None,
        "created_utc": created_value,
        "edited": edited,
        "gilded": 0,
        "id": item_id,
        "retrieved_on": created + 86400 * 30,
        "score": score,
        "stickied": False,
        "subreddit": subreddit,
        "subreddit_id": f"t5_{sub_index + 1000:x}",
        "distinguished": None,
    }
    if kind == "comments":
        common.update(
            body="\x00BODY",
            controversiality=int(rng.random() < 0.05),
            link_id=f"t3_{rng.getrandbits(32):x}",
            parent_id=f"t1_{rng.getrandbits(32):x}",
            ups=score,
        )
        return common
    common.update(
        title=" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 15))),
        selftext="\x00BODY",
        domain=f"self.{subreddit}",
        url=f"https://www.reddit.com/r/{subreddit}/comments/{item_id}/",
        permalink=f"/r/{subreddit}/comments/{item_id}/",
        num_comments=rng.randint(0, 500),
        over_18=rng.random() < 0.05,
        is_self=True,
        thumbnail="self",
        link_flair_text=None,
        media=None,
        secure_media=None,
        spoiler=False,
        locked=False,
        upvote_ratio=round(rng.random(), 2),
        is_video=False,
        num_crossposts=0,
        whitelist_status="all_ads",
    )
    return common


def generate(
    path_or_handle,
    spec: SynthSpec,
    frame_bytes: int | None = None,
    window_log: int = 31,
    level: int = 3,
) -> dict:
    """Writes an archive; returns its record count and decompressed size.

    Without ``frame_bytes`` it is one frame with a ``2**window_log`` window
    and no content size, as the dumps are; with it, a seekable multi-frame
    file. A path ending in .ndjson or .jsonl is written uncompressed.
    """
    own = isinstance(path_or_handle, str)
    handle: BinaryIO = open(path_or_handle, "wb") if own else path_or_handle
    count = size = 0
    try:
        if own and path_or_handle.endswith((".ndjson", ".jsonl")):
            for line in record_lines(spec):
                handle.write(line)
                count += 1
                size += len(line)
        elif frame_bytes:
            writer = SeekableWriter(handle, frame_bytes, level=level)
            for line in record_lines(spec):
                writer.write(line)
                count += 1
                size += len(line)
            writer.close()
        else:
            params = zstandard.ZstdCompressionParameters.from_level(
                level,
                window_log=window_log,
                enable_ldm=window_log > 27,
                write_checksum=1,
                write_content_size=0,
                threads=-1,
            )
            compressor = zstandard.ZstdCompressor(compression_params=params)
            with compressor.stream_writer(handle, closefd=False) as writer:
                batch: list[bytes] = []
                for line in record_lines(spec):
                    batch.append(line)
                    count += 1
                    size += len(line)
                    if len(batch) >= 2048:
                        writer.write(b"".join(batch))
                        batch = []
                writer.write(b"".join(batch))
    finally:
        if own:
            handle.close()
    return {"records": count, "decompressed_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipeline.synth",
        description="Write a synthetic Pushshift-like archive.",
    )
    parser.add_argument(
        "output", help="The archive to write (.zst, or .ndjson/.jsonl for plain)."
    )
    parser.add_argument(
        "--size",
        default="10MB",
        help="Decompressed size to reach, such as 64MB or 1GB.",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help="Write exactly this many records instead of a size.",
    )
    parser.add_argument(
        "--kind",
        choices=("comments", "submissions"),
        default="comments",
        help="Record layout.",
    )
    parser.add_argument(
        "--month",
        default="2019-10",
        help="YYYY-MM whose layout and type drift to copy.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="Random seed; the same seed writes the same archive.",
    )
    parser.add_argument(
        "--frame_bytes",
        default=None,
        help="Write a seekable archive with frames of this decompressed size.",
    )
    parser.add_argument(
        "--window_log",
        type=int,
        default=31,
        help="Window of the single frame, as a power of two.",
    )
    parser.add_argument("--level", type=int, default=3, help="zstd compression level.")
    args = parser.parse_args(argv)

    try:
        spec = SynthSpec(
            args.kind, args.month, parse_size(args.size), args.records, args.seed
        )
        frame_bytes = parse_size(args.frame_bytes) if args.frame_bytes else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    result = generate(args.output, spec, frame_bytes, args.window_log, args.level)
    print(
        f"wrote {args.output}: {result['records']:,} records,"
        f" {result['decompressed_bytes']:,} bytes decompressed in {time.time() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
