"""Batching: full batches formed where records are read, the rest grouped by Beam.

Beam's ``GroupIntoBatches`` keeps per-key state and costs tens of
microseconds a record, several times reading and parsing it. So records
reach it in two ways:

* ``CollectBatches`` keeps, within a bundle, a buffer per key. A buffer that
  reaches the batch size leaves at once as a finished batch, handed on in the
  same stage, without passing through ``GroupIntoBatches``.
* What is left in the buffers when the bundle ends (or when they hold too
  many bytes, or have waited longer than the buffering limit) goes to
  ``GroupIntoBatches`` record by record, which groups it across bundles.
  With ``--leftover_grouping=group_by_key`` and no buffering limit, the
  leftovers go instead as one list per key and bundle to a ``GroupByKey``,
  after which ``CutBatches`` cuts each key's records into batches, at a
  cost per list rather than per record (docs/performance.md compares the
  two on a full job).

Every batch therefore holds exactly the batch size, except the last one
``GroupIntoBatches`` flushes for each key and those flushed early by the
buffering limit, as with ``GroupIntoBatches`` alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam import typehints

__all__ = ["BatchRecords", "BlockRecords", "CollectBatches", "CutBatches"]

RecordKV = typehints.Tuple[str, typehints.Tuple[int, bytes]]
BlockRecords = typehints.List[RecordKV]
BatchKV = typehints.Tuple[str, typehints.Iterable[typehints.Tuple[int, bytes]]]

LEFTOVER_TAG = "leftover"
# How the records left in a bundle's buffers are grouped across bundles:
# record by record in Beam's GroupIntoBatches, or as one list per key and
# bundle through a GroupByKey, cut into batches after it.
LEFTOVER_GROUPINGS = ("group_into_batches", "group_by_key")

# Bytes a bundle's buffers may hold before the stalest go on to be grouped
# across bundles, so that many small keys cannot fill a worker's memory.
DEFAULT_BUFFER_BYTES = 256 * 2**20


class CollectBatches(beam.DoFn):
    """Emits full batches per key; tags the rest as leftovers."""

    def __init__(
        self,
        batch_size: int,
        max_buffering_secs: float | None = None,
        max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        leftovers_as_lists: bool = False,
    ) -> None:
        self._batch_size = batch_size
        self._max_wait = max_buffering_secs
        self._max_bytes = max_buffer_bytes
        self._as_lists = leftovers_as_lists

    def start_bundle(self) -> None:
        self._buffers: dict[str, list[tuple[int, bytes]]] = {}
        self._sizes: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._bytes = 0
        self._seen = 0
        # The record count at each key's last record, for spilling the
        # buffers that grow slowest first.
        self._last: dict[str, int] = {}
        self._count = 0
        self._next_spill_check = 4096

    def process(self, records: list[tuple[str, tuple[int, bytes]]]) -> Iterator:
        """Adds one block's (key, record) pairs to the buffers."""
        buffers = self._buffers
        sizes = self._sizes
        last = self._last
        batch_size = self._batch_size
        count = self._count
        added = 0
        for key, record in records:
            buffer = buffers.get(key)
            if buffer is None:
                buffer = buffers[key] = []
                sizes[key] = 0
                if self._max_wait is not None:
                    self._since[key] = time.monotonic()
            buffer.append(record)
            count += 1
            last[key] = count
            size = len(record[1]) + 64
            sizes[key] += size
            added += size
            if len(buffer) >= batch_size:
                self._bytes += added
                added = 0
                self._drop(key)
                yield key, buffer
        self._count = count
        self._bytes += added

        self._seen += len(records)
        if self._seen >= self._next_spill_check:
            self._next_spill_check = self._seen + 4096
            yield from self._spill()

    def _drop(self, key: str) -> list[tuple[int, bytes]]:
        self._bytes -= self._sizes.pop(key)
        self._since.pop(key, None)
        self._last.pop(key, None)
        return self._buffers.pop(key)

    def _spill(self) -> Iterator:
        """Sends old or oversized buffers on to be grouped across bundles."""
        if self._max_wait is not None:
            deadline = time.monotonic() - self._max_wait
            for key in [key for key, since in self._since.items() if since < deadline]:
                for record in self._drop(key):
                    yield beam.pvalue.TaggedOutput(LEFTOVER_TAG, (key, record))
        if self._bytes > self._max_bytes:
            # The keys that received no record for longest go first: their
            # buffers would most likely be left over at the end anyway, where
            # spilling the largest would send on records close to filling
            # a batch.
            for key in sorted(self._sizes, key=self._last.__getitem__):
                yield from self._leftovers(key, self._drop(key))
                if self._bytes <= self._max_bytes // 2:
                    break

    def _leftovers(self, key: str, buffer: list[tuple[int, bytes]]) -> Iterator:
        """A buffer sent on to be grouped: whole, or record by record."""
        if self._as_lists:
            yield beam.pvalue.TaggedOutput(LEFTOVER_TAG, (key, buffer))
            return
        for record in buffer:
            yield beam.pvalue.TaggedOutput(LEFTOVER_TAG, (key, record))

    def finish_bundle(self) -> Iterator:
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for key, buffer in self._buffers.items():
            for output in self._leftovers(key, buffer):
                yield beam.pvalue.TaggedOutput(
                    LEFTOVER_TAG, WindowedValue(output.value, 0, [GlobalWindow()])
                )
        self.start_bundle()


class CutBatches(beam.DoFn):
    """Cuts the leftovers of one key, gathered from every bundle, into batches.

    All batches but the last hold ``batch_size`` records, the records in
    order of position.
    """

    def __init__(self, batch_size: int) -> None:
        self._batch_size = batch_size

    def process(
        self, element: tuple[str, Iterable[list[tuple[int, bytes]]]]
    ) -> Iterator:
        key, parts = element
        records = sorted(record for part in parts for record in part)
        size = self._batch_size
        for start in range(0, len(records), size):
            yield key, records[start : start + size]


class BatchRecords(beam.PTransform):
    """Groups (key, (position, line)) records into batches of ``batch_size``.

    Takes lists of such records, one list per block read, as
    ``ParseRecords`` emits them.

    Returns two PCollections of (key, records) batches: those formed where
    the records were read, and those ``GroupIntoBatches`` formed. Apply the
    batch handler to each, so the first are handed on while reading goes on.
    """

    def __init__(
        self,
        batch_size: int,
        max_buffering_secs: float | None = None,
        max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        leftover_grouping: str = "group_into_batches",
        spread_leftovers: bool = True,
    ) -> None:
        super().__init__()
        if leftover_grouping not in LEFTOVER_GROUPINGS:
            raise ValueError(
                f"leftover grouping must be one of {LEFTOVER_GROUPINGS}, not {leftover_grouping!r}"
            )
        self._batch_size = batch_size
        self._max_wait = max_buffering_secs
        self._max_bytes = max_buffer_bytes
        self._spread = spread_leftovers
        # Lists need no early flushes, so a buffering limit keeps the
        # record-by-record path through GroupIntoBatches.
        self._as_lists = (
            leftover_grouping == "group_by_key" and max_buffering_secs is None
        )

    def expand(self, records):
        collected = records | "CollectFullBatches" >> beam.ParDo(
            CollectBatches(
                self._batch_size, self._max_wait, self._max_bytes, self._as_lists
            )
        ).with_output_types(BatchKV).with_outputs(LEFTOVER_TAG, main="full")
        if self._as_lists:
            # Without a buffering limit nothing is flushed early, so a
            # bundle's leftovers of a key travel as one list: a GroupByKey
            # gathers each key's lists and the batches are cut from them,
            # at a cost per list where GroupIntoBatches costs per record.
            parts = collected[LEFTOVER_TAG] | "TypeLeftovers" >> beam.Map(
                lambda part: part
            ).with_output_types(BatchKV)
            grouped = (
                parts
                | "GatherLeftovers" >> beam.GroupByKey()
                | "CutLeftovers"
                >> beam.ParDo(CutBatches(self._batch_size)).with_output_types(BatchKV)
            )
            return collected.full, grouped
        leftovers = collected[LEFTOVER_TAG] | "TypeLeftovers" >> beam.Map(
            lambda record: record
        ).with_output_types(RecordKV)
        if self._spread:
            # A shuffle before the stateful step keeps it out of the reader's
            # fused stage: the FnApiRunner runs a stage that holds state on
            # one worker only, however many --direct_num_workers there are.
            # With one worker, fusing saves the shuffle's cost per record.
            leftovers = (
                leftovers
                | "SpreadLeftovers" >> beam.Reshuffle().with_output_types(RecordKV)
            )
        grouped = leftovers | "GroupIntoBatches" >> beam.GroupIntoBatches(
            self._batch_size, max_buffering_duration_secs=self._max_wait
        )
        # Two outputs rather than one flattened: on the FnApiRunner a Flatten
        # of two stages' outputs is consumed by a stage of its own, which
        # would hold the full batches back until reading ends.
        return collected.full, grouped
