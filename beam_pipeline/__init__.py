"""Batch processing of Reddit's Pushshift dump archives on Apache Beam."""

__version__ = "0.1.0"
