"""The job's pipeline options and their validation."""

from __future__ import annotations

import datetime

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.reader import ReaderConfig
from transforms.records import BATCH_KEYS, RecordFilter

__all__ = [
    "OptionError",
    "PushshiftOptions",
    "parse_time",
    "reader_config",
    "record_filter",
]

MIB = 2**20


class OptionError(ValueError):
    """A user mistake in the options, reported as one line before any work."""


class PushshiftOptions(PipelineOptions):
    """Options of the Pushshift archive job, beside Beam's own."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("input and output")
        group.add_argument(
            "--input",
            action="append",
            default=None,
            help="Archive path or glob to read, local or on any filesystem Beam"
            " knows (gs://); repeat for more. Reads .zst archives and plain"
            " .ndjson or .jsonl files.",
        )
        group.add_argument(
            "--output",
            default=None,
            help="Folder the job writes its batches, dead letters and summary to.",
        )
        group.add_argument(
            "--checkpoint_dir",
            default=None,
            help="Folder for the job state that lets an interrupted run resume;"
            " defaults to OUTPUT/_state.",
        )
        group.add_argument(
            "--restart",
            action="store_true",
            default=False,
            help="Discard the state and output of an earlier run in OUTPUT and start over.",
        )
        group.add_argument(
            "--tolerate_damage",
            action="store_true",
            default=False,
            help="Finish with success even when some archives are damaged; they are still listed in the summary.",
        )

        group = parser.add_argument_group("filters")
        group.add_argument(
            "--subreddit",
            action="append",
            default=None,
            help="Keep records of this subreddit (case-insensitive); comma-separated or repeated for more.",
        )
        group.add_argument(
            "--author",
            action="append",
            default=None,
            help="Keep records by this author (case-insensitive); comma-separated or repeated for more.",
        )
        group.add_argument(
            "--since",
            default=None,
            help="Keep records created at or after this time: an ISO date or time (UTC) or epoch seconds.",
        )
        group.add_argument(
            "--until",
            default=None,
            help="Keep records created before this time: an ISO date or time (UTC) or epoch seconds.",
        )
        group.add_argument(
            "--parse_all_lines",
            action="store_true",
            default=False,
            help="Parse every line. By default, with --subreddit or --author, a line"
            " that does not hold a wanted name as a JSON string is counted as read"
            " without being parsed, so damage in it is not reported.",
        )
        group.add_argument(
            "--fields",
            action="append",
            default=None,
            help="Keep only these fields of each record, comma-separated or repeated; records are then re-serialised.",
        )

        group = parser.add_argument_group("batching")
        group.add_argument(
            "--batch_size", type=int, default=1000, help="Records per batch handed on."
        )
        group.add_argument(
            "--batch_max_buffering_secs",
            type=float,
            default=None,
            help="Hand on a batch that has waited this many seconds even if it is not full.",
        )
        group.add_argument(
            "--batch_key",
            default="subreddit",
            help="What batches are grouped by: subreddit, author or none (evenly sharded keys).",
        )
        group.add_argument(
            "--num_shards",
            type=int,
            default=16,
            help="How many keys records are spread over when --batch_key is none.",
        )
        group.add_argument(
            "--leftover_grouping",
            default="group_into_batches",
            help="How records left over per key when a bundle ends are grouped across"
            " bundles: group_into_batches (Beam's GroupIntoBatches, record by record)"
            " or group_by_key (one list per key and bundle, then cut into batches;"
            " used only without --batch_max_buffering_secs; docs/performance.md"
            " compares the two).",
        )
        group.add_argument(
            "--batch_handler",
            default=None,
            help="module:Class, a subclass of transforms.sinks.BatchHandler, that"
            " receives each batch instead of the file writer; it is built with the"
            " output and state folders.",
        )

        group = parser.add_argument_group("reading and memory")
        group.add_argument(
            "--read_chunk_bytes",
            type=int,
            default=MIB,
            help="Compressed bytes read from an archive at a time.",
        )
        group.add_argument(
            "--block_bytes",
            type=int,
            default=MIB,
            help="Decompressed bytes taken from the decoder at a time; lines are handed on in blocks of about this size.",
        )
        group.add_argument(
            "--read_ahead_blocks",
            type=int,
            default=2,
            help="Blocks a thread of each reader decompresses ahead of parsing, on a spare"
            " core; 0 decompresses in line, for machines where every core runs a worker.",
        )
        group.add_argument(
            "--max_record_bytes",
            type=int,
            default=64 * MIB,
            help="Longest line kept as a record; longer lines go to the dead letters, truncated.",
        )
        group.add_argument(
            "--max_bad_line_share",
            type=float,
            default=0.5,
            help="Stop reading an archive, as probably not a dump, when more than this share of a window of lines are not JSON objects.",
        )
        group.add_argument(
            "--desired_split_bytes",
            type=int,
            default=256 * MIB,
            help="Decompressed bytes per initial split of an archive that can be split (multi-frame with known sizes, or plain).",
        )
        group.add_argument(
            "--max_memory_mb",
            type=int,
            default=None,
            help="Memory bound for the job's workers on one machine; decoders that would pass it wait. Defaults to three quarters of available memory.",
        )
        group.add_argument(
            "--memory_retry_secs",
            type=float,
            default=5.0,
            help="How long a reader that could not get memory waits before it tries again.",
        )
        group.add_argument(
            "--fan_out",
            default="auto",
            help="Reshuffle line blocks so parsing spreads over workers: on, off, or auto (the runner profile decides).",
        )
        group.add_argument(
            "--progress_interval_secs",
            type=float,
            default=10.0,
            help="How often each worker reports progress and memory.",
        )
        group.add_argument(
            "--profile",
            default=None,
            help="A named set of options (laptop, workstation, flink, dataflow) or a JSON file of options; flags given on the command line win.",
        )


def parse_time(text: str | None, flag: str) -> float | None:
    """Epoch seconds from epoch digits or an ISO date or time (UTC)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise OptionError(
            f"{flag} {text!r} is neither an ISO date (2024-01-31) nor epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def _names(values: list[str] | None, flag: str) -> frozenset[str]:
    """Lower-cased names, comma-separated or repeated; raises OptionError on an empty one."""
    names = set()
    for value in values or []:
        for name in value.split(","):
            if not name.strip():
                raise OptionError(
                    f"{flag} {value!r} holds an empty name; an empty filter would keep every record"
                )
            names.add(name.strip().lower())
    return frozenset(names)


def record_filter(options: PushshiftOptions) -> RecordFilter:
    """The record filter the options describe; raises OptionError."""
    since = parse_time(options.since, "--since")
    until = parse_time(options.until, "--until")
    if since is not None and until is not None and since >= until:
        raise OptionError(
            f"--since {options.since} is not before --until {options.until}"
        )
    if options.batch_key not in BATCH_KEYS:
        raise OptionError(
            f"--batch_key must be one of {', '.join(BATCH_KEYS)}, not {options.batch_key!r}"
        )
    if options.num_shards < 1:
        raise OptionError(f"--num_shards must be at least 1, not {options.num_shards}")
    fields = tuple(
        name.strip()
        for value in options.fields or []
        for name in value.split(",")
        if name.strip()
    )
    return RecordFilter(
        subreddits=_names(options.subreddit, "--subreddit"),
        authors=_names(options.author, "--author"),
        since=since,
        until=until,
        fields=fields,
        batch_key=options.batch_key,
        num_shards=options.num_shards,
        max_record_bytes=options.max_record_bytes,
        parse_all_lines=options.parse_all_lines,
    )


def reader_config(
    options: PushshiftOptions, max_memory_bytes: int, ledger_key: str
) -> ReaderConfig:
    """The reader's sizes from the options; raises OptionError."""
    for flag in ("read_chunk_bytes", "block_bytes", "max_record_bytes"):
        value = getattr(options, flag)
        if value < 1024:
            raise OptionError(f"--{flag} must be at least 1024, not {value}")
    if not 0 < options.max_bad_line_share <= 1:
        raise OptionError(
            f"--max_bad_line_share must be in (0, 1], not {options.max_bad_line_share}"
        )
    if options.read_ahead_blocks < 0:
        raise OptionError(
            f"--read_ahead_blocks must not be negative, not {options.read_ahead_blocks}"
        )
    if options.desired_split_bytes < 0:
        raise OptionError(
            f"--desired_split_bytes must not be negative, not {options.desired_split_bytes}"
        )
    return ReaderConfig(
        read_chunk_bytes=options.read_chunk_bytes,
        block_bytes=options.block_bytes,
        max_record_bytes=options.max_record_bytes,
        desired_split_bytes=options.desired_split_bytes,
        max_memory_bytes=max_memory_bytes,
        memory_retry_secs=options.memory_retry_secs,
        max_bad_line_share=options.max_bad_line_share,
        memory_ledger_key=ledger_key,
        progress_interval_secs=options.progress_interval_secs,
        read_ahead_blocks=options.read_ahead_blocks,
    )


def validate_batching(options: PushshiftOptions) -> None:
    if options.batch_size < 1:
        raise OptionError(f"--batch_size must be at least 1, not {options.batch_size}")
    if (
        options.batch_max_buffering_secs is not None
        and options.batch_max_buffering_secs <= 0
    ):
        raise OptionError(
            f"--batch_max_buffering_secs must be positive, not {options.batch_max_buffering_secs}"
        )
    if options.leftover_grouping not in ("group_into_batches", "group_by_key"):
        raise OptionError(
            "--leftover_grouping must be group_into_batches or group_by_key,"
            f" not {options.leftover_grouping!r}"
        )
    if options.fan_out not in ("auto", "on", "off"):
        raise OptionError(f"--fan_out must be on, off or auto, not {options.fan_out!r}")
    if options.max_memory_mb is not None and options.max_memory_mb < 64:
        raise OptionError(
            f"--max_memory_mb must be at least 64, not {options.max_memory_mb}"
        )
