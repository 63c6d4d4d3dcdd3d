"""The reference: the job's work as a plain single-process Python loop.

It uses the libraries the job uses, the way a careful script would: stream
the archive through python-zstandard with the dumps' 2 GiB window, cut the
output into lines, parse each with ``orjson.loads``, keep the matches (the
chosen fields re-serialised), gather them per subreddit and write every
batch of ``--batch_size`` as one zstd-compressed JSONL file, the last batch
of each key at the end. No Beam, no threads, nothing held beyond the open
batches.

    python -m tests.bench.reference OUT ARCHIVE... [--subreddit NAME] [--fields a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import orjson
import zstandard

__all__ = ["main", "run_reference"]

# The dumps' window: one frame written with --long=31.
MAX_WINDOW_SIZE = 2**31
# Compressed bytes read and decompressed bytes taken at a time, as the job's
# defaults.
READ_BYTES = 2**20


def run_reference(
    archives: list[str],
    output: str,
    subreddits: frozenset[str] = frozenset(),
    fields: tuple[str, ...] = (),
    batch_size: int = 1000,
) -> dict:
    """Runs the loop over ``archives`` and returns its counts.

    Args:
        archives: zstd archives to read, one after the other.
        output: folder the batch files are written to.
        subreddits: lower-case names to keep; every record when empty.
        fields: fields to keep of each kept record; the whole line when empty.
        batch_size: records per batch file.

    Returns:
        Records read, matched and written, batches written, lines that are
        not JSON, decompressed bytes and seconds taken.
    """
    started = time.perf_counter()
    os.makedirs(output, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=3)
    buffers: dict[str, list[bytes]] = {}
    counts = dict.fromkeys(("read", "matched", "written", "batches", "bad", "bytes"), 0)

    def write(key: str, lines: list[bytes]) -> None:
        payload = b"".join(line + b"\n" for line in lines)
        name = f"{key.encode('utf-8').hex()[:80]}-{counts['batches']:08d}.jsonl.zst"
        with open(os.path.join(output, name), "wb") as handle:
            handle.write(compressor.compress(payload))
        counts["batches"] += 1
        counts["written"] += len(lines)

    loads = orjson.loads
    for path in archives:
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
        with open(path, "rb") as handle:
            reader = decompressor.stream_reader(handle, read_size=READ_BYTES)
            pending = b""
            while True:
                chunk = reader.read(READ_BYTES)
                if not chunk:
                    lines = [pending] if pending else []
                else:
                    counts["bytes"] += len(chunk)
                    data = pending + chunk
                    cut = data.rfind(b"\n")
                    if cut < 0:
                        pending = data
                        continue
                    lines = data[:cut].split(b"\n")
                    pending = data[cut + 1 :]
                for line in lines:
                    try:
                        record = loads(line)
                    except orjson.JSONDecodeError:
                        counts["bad"] += 1
                        continue
                    counts["read"] += 1
                    name = record.get("subreddit")
                    key = name.lower() if isinstance(name, str) else "_missing"
                    if subreddits and key not in subreddits:
                        continue
                    counts["matched"] += 1
                    if fields:
                        line = orjson.dumps(
                            {
                                field: record[field]
                                for field in fields
                                if field in record
                            }
                        )
                    batch = buffers.get(key)
                    if batch is None:
                        batch = buffers[key] = []
                    batch.append(line)
                    if len(batch) >= batch_size:
                        write(key, batch)
                        del buffers[key]
                if not chunk:
                    break
    for key, lines in buffers.items():
        write(key, lines)
    counts["secs"] = time.perf_counter() - started
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.reference", description=__doc__
    )
    parser.add_argument("output", help="Folder to write batch files to.")
    parser.add_argument("archives", nargs="+", help="zstd archives to read.")
    parser.add_argument(
        "--subreddit",
        action="append",
        default=[],
        help="Subreddit to keep; repeatable.",
    )
    parser.add_argument("--fields", default="", help="Comma-separated fields to keep.")
    parser.add_argument(
        "--batch_size", type=int, default=1000, help="Records per batch file."
    )
    args = parser.parse_args(argv)
    counts = run_reference(
        args.archives,
        args.output,
        frozenset(name.lower() for name in args.subreddit),
        tuple(field for field in args.fields.split(",") if field),
        args.batch_size,
    )
    json.dump(counts, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
