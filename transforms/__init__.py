"""The job's transforms: reading, parsing, batching, sinks and metrics."""
