"""Beam metrics of the job, all in one namespace with guessable names.

Counters are named for what they count (``records_read``,
``compressed_bytes_read``); per-archive counters add the archive's file
name after a slash (``records_read/RC_2023-01.zst``), so they sum correctly
however an archive is split over workers or retried. Distributions and
gauges carry their unit in the name (``record_bytes``,
``worker_rss_bytes``).
"""

from __future__ import annotations

import threading

from apache_beam.metrics import Metrics
from apache_beam.metrics.metricbase import Counter

__all__ = ["ARCHIVE_COUNTERS", "NAMESPACE", "archive_counter", "split_archive_metric"]

NAMESPACE = "pushshift"

# Counters.
RECORDS_READ = Metrics.counter(NAMESPACE, "records_read")
RECORDS_MATCHED = Metrics.counter(NAMESPACE, "records_matched")
RECORDS_WRITTEN = Metrics.counter(NAMESPACE, "records_written")
RECORDS_SKIPPED_ON_RESUME = Metrics.counter(NAMESPACE, "records_skipped_on_resume")
BLANK_LINES = Metrics.counter(NAMESPACE, "blank_lines")
# Lines a name filter showed cannot match, counted as read but not parsed.
RECORDS_PASSED_OVER = Metrics.counter(NAMESPACE, "records_passed_over")
INVALID_UTF8_RECORDS = Metrics.counter(NAMESPACE, "invalid_utf8_records")
DEAD_LETTERS = Metrics.counter(NAMESPACE, "dead_letters")
OVERSIZED_RECORDS = Metrics.counter(NAMESPACE, "oversized_records")
COMPRESSED_BYTES = Metrics.counter(NAMESPACE, "compressed_bytes_read")
DECOMPRESSED_BYTES = Metrics.counter(NAMESPACE, "decompressed_bytes_read")
BATCHES_WRITTEN = Metrics.counter(NAMESPACE, "batches_written")
ARCHIVES_DAMAGED = Metrics.counter(NAMESPACE, "archives_damaged")
ARCHIVES_ABANDONED = Metrics.counter(NAMESPACE, "archives_abandoned")
# Times a reader could not open its decoder at once and waited or deferred,
# and the milliseconds readers spent waiting in place.
MEMORY_DEFERRALS = Metrics.counter(NAMESPACE, "memory_deferrals")
MEMORY_WAIT_MSECS = Metrics.counter(NAMESPACE, "memory_wait_msecs")
MEMORY_THROTTLES = Metrics.counter(NAMESPACE, "memory_throttles")
MEMORY_THROTTLED_MSECS = Metrics.counter(NAMESPACE, "memory_throttled_msecs")

# Distributions.
RECORD_BYTES = Metrics.distribution(NAMESPACE, "record_bytes")
BATCH_RECORDS = Metrics.distribution(NAMESPACE, "batch_records")
WORKER_RSS = Metrics.distribution(NAMESPACE, "worker_rss_bytes")

# Gauges.
WORKER_RSS_NOW = Metrics.gauge(NAMESPACE, "worker_rss_bytes_now")
MACHINE_AVAILABLE = Metrics.gauge(NAMESPACE, "machine_available_bytes")
DECODER_WINDOWS = Metrics.gauge(NAMESPACE, "decoder_window_bytes_open")

# What is counted per archive, as ``<kind>/<archive file name>``. Records
# per archive, a distribution over archives, is derived from the
# ``records_read/...`` counters after the run: a distribution updated by a
# worker could not know when the last of an archive's restrictions, which
# may run on other workers, has finished.
ARCHIVE_COUNTERS = (
    "records_read",
    "records_matched",
    "compressed_bytes_read",
    "decompressed_bytes_read",
)

_ARCHIVE_COUNTERS: dict[tuple[str, str], Counter] = {}
_ARCHIVE_LOCK = threading.Lock()


def archive_counter(kind: str, archive: str) -> Counter:
    """The counter of ``kind`` (one of ``ARCHIVE_COUNTERS``) for one archive.

    Args:
        kind: what is counted, e.g. ``records_read``.
        archive: the archive's file name, e.g. ``RC_2023-01.zst``.

    Returns:
        A Beam counter named ``<kind>/<archive>`` in the job's namespace.
    """
    key = (kind, archive)
    counter = _ARCHIVE_COUNTERS.get(key)
    if counter is None:
        with _ARCHIVE_LOCK:
            counter = _ARCHIVE_COUNTERS.setdefault(
                key, Metrics.counter(NAMESPACE, f"{kind}/{archive}")
            )
    return counter


def split_archive_metric(name: str) -> tuple[str, str] | None:
    """(kind, archive) of a per-archive counter's name, or None for others."""
    kind, slash, archive = name.partition("/")
    if not slash or kind not in ARCHIVE_COUNTERS or not archive:
        return None
    return kind, archive
