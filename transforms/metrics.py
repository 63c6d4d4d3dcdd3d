"""Beam metrics of the job, all in one namespace with guessable names."""

from __future__ import annotations

from apache_beam.metrics import Metrics

__all__ = ["NAMESPACE"]

NAMESPACE = "pushshift"

# Counters.
RECORDS_READ = Metrics.counter(NAMESPACE, "records_read")
RECORDS_MATCHED = Metrics.counter(NAMESPACE, "records_matched")
RECORDS_WRITTEN = Metrics.counter(NAMESPACE, "records_written")
RECORDS_SKIPPED_ON_RESUME = Metrics.counter(NAMESPACE, "records_skipped_on_resume")
BLANK_LINES = Metrics.counter(NAMESPACE, "blank_lines")
INVALID_UTF8_RECORDS = Metrics.counter(NAMESPACE, "invalid_utf8_records")
DEAD_LETTERS = Metrics.counter(NAMESPACE, "dead_letters")
OVERSIZED_RECORDS = Metrics.counter(NAMESPACE, "oversized_records")
COMPRESSED_BYTES = Metrics.counter(NAMESPACE, "compressed_bytes_read")
DECOMPRESSED_BYTES = Metrics.counter(NAMESPACE, "decompressed_bytes_read")
BATCHES_WRITTEN = Metrics.counter(NAMESPACE, "batches_written")
ARCHIVES_DAMAGED = Metrics.counter(NAMESPACE, "archives_damaged")
ARCHIVES_ABANDONED = Metrics.counter(NAMESPACE, "archives_abandoned")
MEMORY_DEFERRALS = Metrics.counter(NAMESPACE, "memory_deferrals")
MEMORY_THROTTLES = Metrics.counter(NAMESPACE, "memory_throttles")

# Distributions.
RECORD_BYTES = Metrics.distribution(NAMESPACE, "record_bytes")
BATCH_RECORDS = Metrics.distribution(NAMESPACE, "batch_records")
ARCHIVE_RECORDS = Metrics.distribution(NAMESPACE, "archive_records")
WORKER_RSS = Metrics.distribution(NAMESPACE, "worker_rss_bytes")

# Gauges.
WORKER_RSS_NOW = Metrics.gauge(NAMESPACE, "worker_rss_bytes_now")
MACHINE_AVAILABLE = Metrics.gauge(NAMESPACE, "machine_available_bytes")
DECODER_WINDOWS = Metrics.gauge(NAMESPACE, "decoder_window_bytes_open")
