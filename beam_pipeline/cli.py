"""The command line: check the options, run the job, write the summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import time
import traceback
import uuid
from collections.abc import Sequence

# Google's auth library otherwise probes the cloud metadata address and
# retries for about 30 seconds before giving up on a machine off the cloud.
os.environ.setdefault("NO_GCE_CHECK", "true")

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions  # noqa: E402

from beam_pipeline import inputs  # noqa: E402
from beam_pipeline.display import ProgressDisplay  # noqa: E402
from beam_pipeline.options import (  # noqa: E402
    OptionError,
    PushshiftOptions,
    reader_config,
    record_filter,
    validate_batching,
)
from beam_pipeline.pipeline import JobPlan, build_pipeline, handler_class  # noqa: E402
from beam_pipeline.state import StateStore  # noqa: E402
from runners import prepare_options, profiles, runner_for, runner_name  # noqa: E402
from transforms.files import TEMP_DIR, join_path  # noqa: E402
from transforms.memory import AUTO_MAX_MEMORY, MemoryGuard, TreeSampler  # noqa: E402
from transforms.metrics import NAMESPACE, split_archive_metric  # noqa: E402
from transforms.reader import archive_index  # noqa: E402
from transforms.records import ResumeFiles  # noqa: E402
from transforms.sinks import DAMAGE_DIR  # noqa: E402

__all__ = ["main", "prepare", "run_job"]

_LOGGER = logging.getLogger("beam_pipeline")

SUMMARY_FILE = "_summary.json"
PROGRESS_DIR = "_progress"

_SUMMARY_COUNTERS = (
    "records_read",
    "records_matched",
    "records_written",
    "batches_written",
    "dead_letters",
    "blank_lines",
    "records_passed_over",
    "invalid_utf8_records",
    "oversized_records",
    "compressed_bytes_read",
    "decompressed_bytes_read",
    "archives_damaged",
    "archives_abandoned",
    "memory_deferrals",
    "memory_throttles",
    "records_skipped_on_resume",
)


def _print_help() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipeline",
        description="Stream Pushshift archives, filter their records and hand them on in batches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    PushshiftOptions._add_argparse_args(parser)
    beam_group = parser.add_argument_group(
        "Beam options (all of Beam's pipeline options are accepted; the common ones)"
    )
    beam_group.add_argument(
        "--runner",
        help="DirectRunner (default), PrismRunner, FlinkRunner or DataflowRunner.",
    )
    beam_group.add_argument(
        "--direct_num_workers",
        help="Workers of the DirectRunner; 0 means one per core.",
    )
    beam_group.add_argument(
        "--direct_running_mode", help="in_memory, multi_threading or multi_processing."
    )
    parser.print_help()
    print("\nprofiles:")
    for name, (description, _) in profiles.PROFILES.items():
        print(f"  {name:12} {description}")


def unknown_flags(arguments: Sequence[str]) -> list[str]:
    """Flags that neither this job nor any of Beam's option sets knows.

    Beam only logs a warning for them; here a misspelt filter would let a
    job run for hours over every record, so they are refused instead.
    """
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen: dict[str, type] = {}
    for option_class in PipelineOptions.__subclasses__():
        seen.setdefault(str(option_class), option_class)
    for option_class in seen.values():
        option_class._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(arguments))
    return [argument for argument in unknown if argument.startswith("-")]


def _check_bound(archives, config, max_memory: int) -> None:
    """Refuses, before any work, a bound smaller than one archive's decoder.

    The window comes from the frame header, read without decompressing.
    """
    for spec in archives:
        cost = MemoryGuard.decoder_cost(
            archive_index(spec.path, spec.size),
            config.read_chunk_bytes,
            config.block_bytes,
            config.max_record_bytes,
            config.read_ahead_blocks,
        )
        if cost > max_memory:
            raise OptionError(
                f"--max_memory_mb {max_memory // 2**20} is too small for {spec.name}:"
                f" its decoder window and buffers need {-(-cost // 2**20):,} MiB;"
                " raise --max_memory_mb or lower --max_record_bytes and --block_bytes"
            )


def prepare(options: PipelineOptions) -> JobPlan:
    """Checks the options and inputs and plans the job; raises OptionError."""
    job = options.view_as(PushshiftOptions)
    prepare_options(options)
    if not job.input:
        raise OptionError("--input is required: name at least one archive or glob")
    if not job.output:
        raise OptionError("--output is required: name the folder to write to")
    validate_batching(job)
    the_filter = record_filter(job)
    try:
        handler_class(job.batch_handler)
    except ValueError as exc:
        raise OptionError(str(exc)) from None

    archives = inputs.match_archives(job.input, job.output)
    inputs.check_output(job.output)

    # Without --max_memory_mb the bound is a share of what the workers'
    # machine has available, decided there (by the launcher on a local run).
    max_memory = job.max_memory_mb * 2**20 if job.max_memory_mb else AUTO_MAX_MEMORY
    config = reader_config(job, max_memory, ledger_key=job.output)
    if job.max_memory_mb:
        _check_bound(archives, config, max_memory)
    local_output = "://" not in job.output
    if local_output:
        config = dataclasses.replace(
            config, progress_dir=os.path.join(job.output, PROGRESS_DIR)
        )
    config = dataclasses.replace(config, run_id=uuid.uuid4().hex)
    spread_leftovers = True
    if runner_name(options) == "DirectRunner":
        # The FnApiRunner drops the work a DoFn defers when it runs more than
        # one worker (its parallel bundles merge away the residuals), so a
        # reader there waits for memory in place instead of deferring.
        config = dataclasses.replace(config, memory_wait_secs=float("inf"))
        # One worker runs every stage anyway: GroupIntoBatches may share the
        # reading stage, unless splits are forced on that stage, where the
        # FnApiRunner then waits forever on the split bundle's timers.
        direct = options.view_as(DirectOptions)
        spread_leftovers = direct.direct_num_workers != 1 or bool(
            direct.direct_test_splits
        )

    fan_out = job.fan_out == "on" or (
        job.fan_out == "auto"
        and profiles.runner_defaults(runner_name(options)).get("fan_out") == "on"
    )
    return JobPlan(
        archives=tuple(archives),
        output=job.output,
        reader=config,
        record_filter=the_filter,
        batch_size=job.batch_size,
        batch_max_buffering_secs=job.batch_max_buffering_secs,
        fan_out=fan_out,
        batch_handler=job.batch_handler,
        leftover_grouping=job.leftover_grouping,
        spread_leftovers=spread_leftovers,
    )


def _metric_totals(result) -> dict:
    """Counters summed over steps, and the distributions' extremes."""
    totals: dict = {name: 0 for name in _SUMMARY_COUNTERS}
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # Some runners answer no metrics at all.
        _LOGGER.warning(
            "the runner reported no metrics; the summary counts are missing"
        )
        return totals
    for counter in queried.get("counters", []):
        value = (
            counter.committed if counter.committed is not None else counter.attempted
        )
        name = counter.key.metric.name
        per_archive = split_archive_metric(name)
        if per_archive is not None:
            kind, archive = per_archive
            entry = totals.setdefault("per_archive", {}).setdefault(archive, {})
            entry[kind] = entry.get(kind, 0) + (value or 0)
            continue
        totals[name] = totals.get(name, 0) + (value or 0)
    latest: dict = {}
    for gauge in queried.get("gauges", []):
        data = gauge.committed or gauge.attempted
        name = gauge.key.metric.name
        if data is not None and (
            name not in latest or data.timestamp >= latest[name].timestamp
        ):
            latest[name] = data
    totals["gauges"] = {name: data.value for name, data in latest.items()}
    for distribution in queried.get("distributions", []):
        data = distribution.committed or distribution.attempted
        if data is None or not data.count:
            continue
        name = distribution.key.metric.name
        entry = totals.setdefault(
            name, {"count": 0, "sum": 0, "min": data.min, "max": data.max}
        )
        entry["count"] += data.count
        entry["sum"] += data.sum
        entry["min"] = min(entry["min"], data.min)
        entry["max"] = max(entry["max"], data.max)
    return totals


def _archive_summary(spec, totals: dict) -> dict:
    """An archive's name, size and its per-archive counters of this run."""
    counted = totals.get("per_archive", {}).get(spec.name, {})
    return {"name": spec.name, "path": spec.path, "size": spec.size, **counted}


def _archive_distribution(plan: JobPlan, totals: dict) -> dict:
    """Records read per archive, over the archives this run read."""
    per_archive = totals.get("per_archive", {})
    counts = [
        per_archive.get(spec.name, {}).get("records_read", 0) for spec in plan.archives
    ]
    if not counts:
        return {}
    return {
        "archive_records_read": {
            "count": len(counts),
            "sum": sum(counts),
            "min": min(counts),
            "max": max(counts),
        }
    }


def _damage_reports(output: str) -> list[dict]:
    reports = []
    pattern = join_path(output, DAMAGE_DIR, "*.json")
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            reports.append(json.loads(handle.read()))
    return sorted(
        reports, key=lambda report: (report["archive"], report["decompressed_offset"])
    )


def _peak_rss(totals: dict) -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    workers = (
        totals.get("worker_rss_bytes", {}).get("max", 0)
        if isinstance(totals.get("worker_rss_bytes"), dict)
        else 0
    )
    return max(own, children, workers)


def _job_description(plan: JobPlan) -> dict:
    """What decides which records are written and how they are grouped."""
    record_filter = plan.record_filter
    return {
        "inputs": [[spec.path, spec.size] for spec in plan.archives],
        "subreddits": sorted(record_filter.subreddits),
        "authors": sorted(record_filter.authors),
        "since": record_filter.since,
        "until": record_filter.until,
        "fields": list(record_filter.fields),
        "batch_key": record_filter.batch_key,
        "num_shards": record_filter.num_shards,
        "max_record_bytes": record_filter.max_record_bytes,
        "batch_size": plan.batch_size,
        "batch_handler": plan.batch_handler,
    }


def open_state(options: PipelineOptions, plan: JobPlan):
    """Locks the output and plans where each archive resumes.

    Returns the plan narrowed to the work left, the held lock and the
    resume plan (None for a fresh run); raises OptionError when the output
    is in use or holds a run with other arguments.
    """
    job = options.view_as(PushshiftOptions)
    store = StateStore(plan.output, job.checkpoint_dir)
    lock = store.lock()
    lock.acquire(plan.output)
    try:
        earlier = store.check_fingerprint(_job_description(plan), job.restart)
        _remove_temporary_files(plan.output)
        resume = store.plan(list(plan.archives)) if earlier else None
    except BaseException:
        lock.release()
        raise
    archives = plan.archives
    reader = plan.reader
    if resume is not None:
        archives = tuple(
            spec._replace(
                start=resume.starts.get(spec.archive_id, 0),
                replay_until=resume.replay_until.get(spec.archive_id, 0),
            )
            for spec in plan.archives
            if spec.archive_id not in resume.finished
        )
        reader = dataclasses.replace(reader, replay_path=store.replay_path)
    narrowed = dataclasses.replace(
        plan,
        archives=archives,
        reader=reader,
        state_dir=store.folder,
        resume=ResumeFiles(plan.output, store.ledger_dir, store.skip_path),
    )
    return narrowed, lock, resume


def _remove_temporary_files(output: str) -> None:
    """Drops what a killed run left half-written in ``OUTPUT/_tmp``."""
    leftovers = FileSystems.match([join_path(output, TEMP_DIR, "*")])[0].metadata_list
    if leftovers:
        FileSystems.delete([meta.path for meta in leftovers])


def run_job(
    options: PipelineOptions, plan: JobPlan, show_progress: bool = True
) -> dict:
    """Runs the planned job to the end, resuming earlier work, and returns its summary.

    Raises OptionError before any work when the output is in use or holds
    a run with other arguments.
    """
    job = options.view_as(PushshiftOptions)
    all_archives = plan.archives
    plan, lock, resume = open_state(options, plan)
    try:
        return _run_locked(options, job, plan, all_archives, resume, show_progress)
    finally:
        lock.release()


def _run_locked(
    options, job, plan: JobPlan, all_archives, resume, show_progress: bool
) -> dict:
    started = time.time()
    resumed_from = resume.describe(list(plan.archives)) if resume else {}
    if resume is not None:
        _LOGGER.info(
            "resuming: %d of %d archives finished earlier; %d records to produce again,"
            " %d already written past the resume points; %s",
            len(resume.finished),
            len(all_archives),
            resume.replay_count,
            resume.skip_count,
            ", ".join(
                f"{name} after decompressed byte {start:,}"
                for name, start in resumed_from.items()
            )
            or "the others start over",
        )
    # The launcher joins the memory ledger before any worker starts: the
    # default bound is then taken before the job uses memory, and what the
    # launcher holds (the DirectRunner keeps data between stages there)
    # counts against it.
    guard = MemoryGuard.for_launcher(
        plan.reader.max_memory_bytes, plan.reader.memory_ledger_key
    )
    sampler = TreeSampler().start()
    display: ProgressDisplay | None = None
    if show_progress and plan.reader.progress_dir and plan.archives:
        display = ProgressDisplay(
            plan.reader.progress_dir,
            {spec.name: spec.size for spec in plan.archives},
            interval_secs=min(job.progress_interval_secs, 5.0),
            resumed_from=resumed_from,
            max_memory_bytes=guard.max_bytes,
        )
        display.start()

    result = state = None
    try:
        if plan.archives:
            pipeline = beam.Pipeline(runner=runner_for(options), options=options)
            build_pipeline(pipeline, plan)
            result = pipeline.run()
            state = result.wait_until_finish()
    finally:
        if display is not None:
            display.stop()
        peak_job_rss = sampler.stop()
        guard.leave()

    if result is None:
        earlier = _earlier_summary(plan.output)
        if earlier is not None:
            # Everything was done before: the earlier run's summary stands.
            _LOGGER.info("nothing left to do: %s holds a finished run", plan.output)
            return {**earlier, "nothing_left_to_do": True}

    elapsed = time.time() - started
    totals = (
        _metric_totals(result)
        if result is not None
        else {name: 0 for name in _SUMMARY_COUNTERS}
    )
    damage = _damage_reports(plan.output)
    summary = {
        "state": str(state) if state is not None else "DONE (nothing left to do)",
        "runner": runner_name(options),
        "elapsed_secs": round(elapsed, 3),
        **{name: totals.get(name, 0) for name in _SUMMARY_COUNTERS},
        "peak_rss_bytes": _peak_rss(totals),
        # Sampled five times a second, so a short peak of one process can
        # slip between samples; that process's own peak cannot.
        "peak_job_rss_bytes": max(peak_job_rss, _peak_rss(totals)),
        "max_memory_bytes": guard.max_bytes,
        "records_per_sec": round(totals.get("records_read", 0) / elapsed, 1)
        if elapsed
        else None,
        "archives": [_archive_summary(spec, totals) for spec in all_archives],
        "resumed": resume is not None,
        "resumed_from": resumed_from,
        "finished_before": sorted(
            spec.name
            for spec in all_archives
            if resume and spec.archive_id in resume.finished
        ),
        "damaged_archives": damage,
        "distributions": {
            **{
                name: value
                for name, value in totals.items()
                if isinstance(value, dict) and name not in ("per_archive", "gauges")
            },
            **_archive_distribution(plan, totals),
        },
        "gauges": totals.get("gauges", {}),
    }
    summary["status"] = (
        "failed: damaged archives"
        if damage and not job.tolerate_damage
        else ("succeeded with damaged archives" if damage else "succeeded")
    )
    _write_summary(plan.output, summary)
    return summary


def _earlier_summary(output: str) -> dict | None:
    path = join_path(output, SUMMARY_FILE)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def _write_summary(output: str, summary: dict) -> None:
    from transforms.sinks import write_atomically

    payload = json.dumps(summary, indent=2, sort_keys=False).encode("utf-8")
    write_atomically(output, join_path(output, SUMMARY_FILE), payload)


def print_summary(summary: dict, stream=sys.stdout) -> None:
    lines = [
        f"status: {summary['status']} ({summary['runner']}, {summary['elapsed_secs']:.1f} s)",
        f"records read {summary['records_read']:,}, matched {summary['records_matched']:,},"
        f" written {summary['records_written']:,} in {summary['batches_written']:,} batches",
        f"dead letters {summary['dead_letters']:,}; bytes read {summary['compressed_bytes_read']:,}"
        f" compressed, {summary['decompressed_bytes_read']:,} decompressed",
        f"peak resident memory {summary['peak_rss_bytes'] / 2**20:,.0f} MiB in one process,"
        f" {summary['peak_job_rss_bytes'] / 2**20:,.0f} MiB in the job's local processes"
        + (
            f" (bound {summary['max_memory_bytes'] / 2**20:,.0f} MiB,"
            f" {summary['memory_deferrals']:,} deferrals)"
            if summary["max_memory_bytes"] > 0
            else ""
        )
        + f"; {summary['records_per_sec'] or 0:,.0f} records/s",
    ]
    for damage in summary["damaged_archives"]:
        lines.append(
            f"damaged: {damage['archive']} at compressed byte {damage['compressed_offset']:,},"
            f" decompressed byte {damage['decompressed_offset']:,}: {damage['reason']}"
        )
    print("\n".join(lines), file=stream)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("apache_beam", "google", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _failure_cause(error: BaseException) -> str:
    """The line of a failed job's error that names its cause.

    A runner wraps a worker's exception in its own, with the worker's trace
    inside the message; the cause is that trace's last line, such as
    ``FileExistsError: [Errno 17] File exists: 'OUT/_tmp' [while running
    'HandOnFullBatches']``.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    cause = lines[-1]
    if cause == lines[0] and not cause.startswith(type(error).__name__):
        cause = f"{type(error).__name__}: {cause}"
    return cause


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the job from command-line arguments; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in arguments):
        _print_help()
        return 0
    _configure_logging()
    try:
        arguments = profiles.apply(arguments)
        unknown = unknown_flags(arguments)
        if unknown:
            raise OptionError(
                f"unknown option {unknown[0]}; see --help for the options of this job"
            )
        options = PipelineOptions(arguments)
        plan = prepare(options)
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        summary = run_job(options, plan)
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # The whole trace first, for whoever debugs it; then one line that
        # says what broke and what is left on disk.
        traceback.print_exc(file=sys.stderr)
        print(
            f"error: the job failed: {_failure_cause(exc)}; the batches it wrote are kept,"
            " and the same command resumes the job once the cause is fixed",
            file=sys.stderr,
        )
        return 1
    print_summary(summary)
    return 1 if summary["status"].startswith("failed") else 0
