"""Assembly of the job: archives in, batches handed on, reports out.

archives -> ReadArchiveBlocks (splittable) -> [Reshuffle] -> ParseRecords
  -> BatchRecords (full batches per bundle; the rest via GroupIntoBatches)
  -> batch handler (files under OUTPUT/batches)
dead letters of reading and parsing -> OUTPUT/dead_letter
damage reports of reading -> OUTPUT/_damage
"""

from __future__ import annotations

import dataclasses
import importlib

import apache_beam as beam

from transforms.batching import BatchRecords, BlockRecords
from transforms.reader import (
    DAMAGE_TAG,
    DEAD_LETTER_TAG,
    ArchiveSpec,
    ReadArchiveBlocks,
    ReaderConfig,
)
from transforms.records import ParseRecords, RecordFilter, ResumeFiles
from transforms.sinks import (
    BatchHandler,
    WriteBatchFiles,
    WriteDamageReports,
    WriteDeadLetters,
)

__all__ = ["JobPlan", "build_pipeline", "handler_class", "load_batch_handler"]


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """Everything the pipeline graph depends on, decided before it is built."""

    archives: tuple[ArchiveSpec, ...]
    output: str
    reader: ReaderConfig
    record_filter: RecordFilter
    batch_size: int
    batch_max_buffering_secs: float | None
    fan_out: bool
    batch_handler: str | None = None
    leftover_grouping: str = "group_into_batches"
    # Whether leftovers are shuffled before GroupIntoBatches, so that a
    # runner need not run it in the reading stage (see BatchRecords).
    spread_leftovers: bool = True
    state_dir: str | None = None
    resume: ResumeFiles | None = None


def handler_class(spec: str | None) -> type:
    """The batch handler class ``module:Class`` names, or the file writer.

    Raises ValueError naming the spec when it cannot be loaded or is not a
    ``BatchHandler``.
    """
    if not spec:
        return WriteBatchFiles
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"--batch_handler {spec!r} must be module:Class")
    try:
        loaded = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--batch_handler {spec!r} cannot be loaded: {exc}") from None
    if not (isinstance(loaded, type) and issubclass(loaded, BatchHandler)):
        raise ValueError(
            f"--batch_handler {spec!r} is not a subclass of transforms.sinks.BatchHandler"
        )
    return loaded


def load_batch_handler(
    spec: str | None, output: str, state_dir: str | None
) -> beam.DoFn:
    """The DoFn batches are handed to, built with the output and state folders."""
    return handler_class(spec)(output, state_dir)


def build_pipeline(pipeline: beam.Pipeline, plan: JobPlan) -> None:
    """Adds the job's transforms to ``pipeline``."""
    names = {spec.archive_id: spec.name for spec in plan.archives}

    read = (
        pipeline
        # Reshuffled so that a runner spreads the archives over its workers:
        # without it the FnApiRunner hands them all to one.
        | "Archives" >> beam.Create(list(plan.archives), reshuffle=True)
        | "ReadArchives"
        >> beam.ParDo(ReadArchiveBlocks(plan.reader, names)).with_outputs(
            DEAD_LETTER_TAG, DAMAGE_TAG, main="blocks"
        )
    )
    blocks = read.blocks
    if plan.fan_out:
        blocks = blocks | "FanOut" >> beam.Reshuffle()

    parsed = blocks | "ParseRecords" >> beam.ParDo(
        ParseRecords(plan.record_filter, names, plan.resume)
    ).with_output_types(BlockRecords).with_outputs(DEAD_LETTER_TAG, main="records")
    records = parsed.records

    batches = records | "Batch" >> BatchRecords(
        plan.batch_size,
        max_buffering_secs=plan.batch_max_buffering_secs,
        leftover_grouping=plan.leftover_grouping,
        spread_leftovers=plan.spread_leftovers,
    )
    full_batches, grouped_batches = batches
    handler = load_batch_handler(plan.batch_handler, plan.output, plan.state_dir)
    _ = full_batches | "HandOnFullBatches" >> beam.ParDo(handler)
    _ = grouped_batches | "HandOnGroupedBatches" >> beam.ParDo(handler)

    _ = (
        (read[DEAD_LETTER_TAG], parsed[DEAD_LETTER_TAG])
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(plan.output))
    )
    _ = read[DAMAGE_TAG] | "WriteDamage" >> beam.ParDo(WriteDamageReports(plan.output))
