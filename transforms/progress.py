"""Per-archive progress of a worker process: percent, rate, ETA and memory.

Readers update an ``ArchiveStats`` per archive as they go. A reporter thread
in each worker process logs the figures at INFO every few seconds and, where
a progress folder is configured, writes them there as one small JSON file
per process, which the launcher of a local run reads to draw its display.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Optional

import psutil

__all__ = ["ArchiveStats", "RateWindow", "archive_stats", "configure", "snapshot", "start_reporter"]

_LOGGER = logging.getLogger(__name__)

# Rates and ETAs come from the last this-many seconds, not from the start.
RATE_WINDOW_SECS = 30.0
# An ETA needs at least this much history in the window.
MIN_HISTORY_SECS = 3.0
# How often a worker rewrites its progress file, where it has a folder.
FILE_INTERVAL_SECS = 2.0


class RateWindow:
    """Recent (time, value) samples of a growing total, for rates and ETAs."""

    def __init__(self, window_secs: float = RATE_WINDOW_SECS) -> None:
        self._window = window_secs
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, when: float, total: float) -> None:
        self._samples.append((when, total))
        while len(self._samples) > 2 and when - self._samples[1][0] > self._window:
            self._samples.popleft()

    def rate(self) -> Optional[float]:
        """Units per second over the window, or None without enough history."""
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_HISTORY_SECS:
            return None
        return (v1 - v0) / (t1 - t0)

    def eta(self, remaining: float) -> Optional[float]:
        rate = self.rate()
        if rate is None or rate <= 0:
            return None
        return remaining / rate


class ArchiveStats:
    """What one worker process has read of one archive."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.compressed = 0
        self.decompressed = 0
        self.position = 0
        self.lock = threading.Lock()

    def advance(self, compressed: int, decompressed: int, position: int) -> None:
        with self.lock:
            self.compressed += compressed
            self.decompressed += decompressed
            self.position = max(self.position, position)

    def as_dict(self) -> dict:
        with self.lock:
            return {
                "name": self.name,
                "size": self.size,
                "compressed": self.compressed,
                "decompressed": self.decompressed,
                "position": self.position,
            }


_REGISTRY: dict[str, ArchiveStats] = {}
_REGISTRY_LOCK = threading.Lock()
_CONFIG = {"folder": "", "interval": 10.0}
_REPORTER: Optional[threading.Thread] = None


def configure(folder: str, interval_secs: float) -> None:
    """Sets where and how often this process reports."""
    _CONFIG["folder"] = folder
    _CONFIG["interval"] = interval_secs


def archive_stats(name: str, size: int) -> ArchiveStats:
    with _REGISTRY_LOCK:
        if name not in _REGISTRY:
            _REGISTRY[name] = ArchiveStats(name, size)
        return _REGISTRY[name]


def snapshot() -> dict:
    """This process's figures, as written to its progress file."""
    with _REGISTRY_LOCK:
        archives = [stats.as_dict() for stats in _REGISTRY.values()]
    process = psutil.Process()
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "rss": process.memory_info().rss,
        "available": psutil.virtual_memory().available,
        "archives": archives,
    }


def start_reporter() -> None:
    """Starts this process's reporter thread once."""
    global _REPORTER
    with _REGISTRY_LOCK:
        if _REPORTER is not None:
            return
        _REPORTER = threading.Thread(target=_report_forever, name="progress-reporter", daemon=True)
        _REPORTER.start()


def _report_forever() -> None:
    windows: dict[str, RateWindow] = {}
    last_log = time.monotonic()
    while True:
        time.sleep(FILE_INTERVAL_SECS)
        try:
            state = snapshot()
            if _CONFIG["folder"]:
                write_progress_file(_CONFIG["folder"], state)
            if time.monotonic() - last_log >= _CONFIG["interval"]:
                last_log = time.monotonic()
                _log_state(state, windows)
        except Exception:  # A failed report must never end the worker.
            _LOGGER.exception("progress report failed")


def _log_state(state: dict, windows: dict[str, RateWindow]) -> None:
    now = state["time"]
    for archive in state["archives"]:
        window = windows.setdefault(archive["name"], RateWindow())
        window.add(now, archive["compressed"])
        done = min(archive["compressed"], archive["size"])
        percent = 100.0 * done / archive["size"] if archive["size"] else 100.0
        eta = window.eta(archive["size"] - done)
        _LOGGER.info(
            "progress %s: %.1f%% of %d compressed bytes, %.1f MB decompressed,"
            " ETA %s, worker RSS %.0f MiB, machine available %.0f MiB",
            archive["name"],
            percent,
            archive["size"],
            archive["decompressed"] / 1e6,
            f"{eta:.0f} s" if eta is not None else "unknown",
            state["rss"] / 2**20,
            state["available"] / 2**20,
        )


def write_progress_file(folder: str, state: dict) -> None:
    """Writes this process's figures atomically (local folders only)."""
    if "://" in folder:
        return
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"worker-{state['pid']}.json")
    temporary = target + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(temporary, target)
