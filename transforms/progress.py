"""Per-archive progress of a worker process: percent, rate, ETA and memory.

Readers update an ``ArchiveStats`` per archive as they go. A reporter
thread in each worker process samples them every two seconds. Where a
progress folder is configured (a local run, whose launcher draws a display
from it) it writes them there as one small JSON file per process,
``worker-<pid>.json``; it also logs them every ``--progress_interval_secs``,
at INFO where no folder is configured (Flink and Dataflow workers, whose
logs are the place to look) and at DEBUG otherwise, since the launcher
shows the same figures.

Percent done is compressed bytes read against the file size, since the
dumps store no decompressed size. Rates come from the last
``RATE_WINDOW_SECS`` only, so an ETA follows the current speed, and there
is no ETA until there are ``MIN_HISTORY_SECS`` of history in at least
``MIN_SAMPLES`` samples, counted from when the work started to move.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Any

import psutil

__all__ = [
    "ArchiveStats",
    "RateWindow",
    "archive_stats",
    "configure",
    "flush",
    "format_eta",
    "snapshot",
    "start_reporter",
    "write_progress_file",
]

_LOGGER = logging.getLogger(__name__)

# Rates and ETAs come from the last this-many seconds, not from the start.
RATE_WINDOW_SECS = 30.0
# A rate needs at least this much history in the window, in at least this
# many samples: fewer say more about the sampling than about the speed.
MIN_HISTORY_SECS = 2.0
MIN_SAMPLES = 3
# How often a worker samples its figures and rewrites its progress file.
FILE_INTERVAL_SECS = 2.0
# How long after its last deferral an archive counts as waiting for memory.
WAITING_SECS = 60.0
MIB = 2**20


class RateWindow:
    """Recent (time, total) samples of a growing total, for rates and ETAs."""

    def __init__(self, window_secs: float = RATE_WINDOW_SECS) -> None:
        self._window = window_secs
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, when: float, total: float) -> None:
        """Records the total at a time; samples older than the window go."""
        if self._samples and when <= self._samples[-1][0]:
            return
        if self._samples and all(value == total for _, value in self._samples):
            # Nothing has moved since the first sample: the wait before the
            # work started is no part of its rate.
            self._samples.clear()
        self._samples.append((when, total))
        # Keep one sample at or beyond the window's start, so the window
        # spans its full length once there is that much history.
        while len(self._samples) > 2 and when - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Units per second over the window, or None without enough history."""
        if len(self._samples) < MIN_SAMPLES:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_HISTORY_SECS:
            return None
        return max(v1 - v0, 0.0) / (t1 - t0)

    def eta(self, remaining: float) -> float | None:
        """Seconds to cover ``remaining`` at the recent rate, or None.

        None when there is too little history or nothing moved lately: an
        absent ETA is better than one that is wrong.
        """
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        if rate is None or rate <= 0:
            return None
        return remaining / rate


def format_eta(seconds: float | None) -> str:
    """``ETA 1h02m``, ``ETA 3m05s``, ``ETA 12s``, or ``ETA --`` when unknown."""
    if seconds is None:
        return "ETA --"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"ETA {hours}h{minutes:02d}m"
    if minutes:
        return f"ETA {minutes}m{secs:02d}s"
    return f"ETA {secs}s"


def format_rate(records_per_sec: float | None, bytes_per_sec: float | None) -> str:
    """``12,345 records/s, 45.6 MB/s``, with ``--`` for unknown rates."""
    records = f"{records_per_sec:,.0f}" if records_per_sec is not None else "--"
    megabytes = f"{bytes_per_sec / 1e6:,.1f}" if bytes_per_sec is not None else "--"
    return f"{records} records/s, {megabytes} MB/s"


class ArchiveStats:
    """What one worker process has read of one archive.

    ``lines`` counts newlines in the decompressed output: records plus the
    few blank or broken lines, counted where the reader is, whichever
    worker parses them.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.compressed = 0
        self.decompressed = 0
        self.lines = 0
        self.position = 0
        self.active = 0
        self.passes_done = 0
        self.whole = False
        self.waiting_since: float | None = None
        self.lock = threading.Lock()

    def begin(self, whole: bool) -> None:
        """A reading pass starts; ``whole`` if it covers the whole archive."""
        with self.lock:
            self.active += 1
            self.whole = whole
            self.waiting_since = None

    def advance(
        self, compressed: int, decompressed: int, position: int, lines: int = 0
    ) -> None:
        """Counts what one decoder read returned.

        Args:
            compressed: compressed bytes the read consumed.
            decompressed: decompressed bytes it returned.
            position: the compressed offset reached.
            lines: newlines in what it returned.
        """
        with self.lock:
            self.compressed += compressed
            self.decompressed += decompressed
            self.lines += lines
            self.position = max(self.position, position)

    def end(self) -> None:
        """A reading pass ended (finished, stopped at a split, or failed)."""
        with self.lock:
            self.active = max(self.active - 1, 0)
            self.passes_done += 1

    def defer(self) -> None:
        """The archive waits for memory before it can be read."""
        with self.lock:
            self.waiting_since = time.time()

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "name": self.name,
                "size": self.size,
                "compressed": self.compressed,
                "decompressed": self.decompressed,
                "lines": self.lines,
                "position": self.position,
                "active": self.active,
                "passes_done": self.passes_done,
                "whole": self.whole,
                # A deferred archive may be taken up by another worker; this
                # one says it waits only while it deferred lately.
                "waiting": not self.active
                and self.waiting_since is not None
                and time.time() - self.waiting_since < WAITING_SECS,
            }


_REGISTRY: dict[str, ArchiveStats] = {}
_REGISTRY_LOCK = threading.Lock()
_CONFIG: dict[str, Any] = {"folder": "", "interval": 10.0, "run": None}
_REPORTER: threading.Thread | None = None
_WRITE_LOCK = threading.Lock()
# Set to make the reporter take a new configuration at once.
_WAKE = threading.Event()


def configure(folder: str, interval_secs: float, run_id: str = "") -> None:
    """Sets where and how often this process reports, and for which run.

    A process that runs several jobs one after the other (the in-process
    DirectRunner) starts each run's figures from zero.
    """
    settings = {
        "folder": folder,
        "interval": max(float(interval_secs), 0.1),
        "run": run_id,
    }
    with _REGISTRY_LOCK:
        if settings == _CONFIG:
            return
        if run_id != _CONFIG["run"]:
            _REGISTRY.clear()
        _CONFIG.update(settings)
    _WAKE.set()


def archive_stats(name: str, size: int) -> ArchiveStats:
    """This process's stats of an archive in the current run, made on first use."""
    with _REGISTRY_LOCK:
        if name not in _REGISTRY:
            _REGISTRY[name] = ArchiveStats(name, size)
        return _REGISTRY[name]


def snapshot() -> dict[str, Any]:
    """This process's figures, as written to its progress file."""
    from transforms.memory import MemoryGuard

    with _REGISTRY_LOCK:
        archives = [stats.as_dict() for stats in _REGISTRY.values()]
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "rss": psutil.Process().memory_info().rss,
        "available": psutil.virtual_memory().available,
        "decoders": [
            {"archive": archive, "bytes": size}
            for archive, size in MemoryGuard.process_reservations()
        ],
        "archives": archives,
    }


def flush() -> None:
    """Writes this process's progress file now, if it has a folder.

    Readers call it when a pass ends or defers, so the file never lags the
    end of an archive by a reporter period.
    """
    folder = _CONFIG["folder"]
    if not folder:
        return
    try:
        with _WRITE_LOCK:
            write_progress_file(folder, snapshot())
    except OSError as exc:
        _LOGGER.debug("could not write progress to %s: %s", folder, exc)


def start_reporter() -> None:
    """Starts this process's reporter thread once."""
    global _REPORTER
    with _REGISTRY_LOCK:
        if _REPORTER is not None and _REPORTER.is_alive():
            return
        _REPORTER = threading.Thread(
            target=_report_forever, name="progress-reporter", daemon=True
        )
        _REPORTER.start()


class _WorkerLog:
    """Rate windows of this process's archives, and what was last logged."""

    def __init__(self) -> None:
        self.compressed: dict[str, RateWindow] = {}
        self.decompressed: dict[str, RateWindow] = {}
        self.lines: dict[str, RateWindow] = {}
        self.last_logged: dict[str, tuple] = {}

    def add(self, state: dict[str, Any]) -> None:
        now = state["time"]
        for archive in state["archives"]:
            name = archive["name"]
            self.compressed.setdefault(name, RateWindow()).add(
                now, archive["compressed"]
            )
            self.decompressed.setdefault(name, RateWindow()).add(
                now, archive["decompressed"]
            )
            self.lines.setdefault(name, RateWindow()).add(now, archive["lines"])

    def lines_to_log(self, state: dict[str, Any]) -> list[str]:
        """One line per archive being read, waiting, or changed since the last log."""
        decoders: dict[str, int] = collections.defaultdict(int)
        for decoder in state["decoders"]:
            decoders[decoder["archive"]] += decoder["bytes"]
        memory = (
            f"worker RSS {state['rss'] / MIB:,.0f} MiB,"
            f" decoders {sum(decoders.values()) / MIB:,.0f} MiB,"
            f" machine available {state['available'] / MIB:,.0f} MiB"
        )
        result = []
        for archive in state["archives"]:
            name = archive["name"]
            key = (archive["compressed"], archive["active"], archive["waiting"])
            if (
                not archive["active"]
                and not archive["waiting"]
                and self.last_logged.get(name) == key
            ):
                continue
            self.last_logged[name] = key
            size = archive["size"]
            at = min(archive["position"], size)
            percent = 100.0 * at / size if size else 100.0
            if archive["active"]:
                doing = "reading"
            elif archive["waiting"]:
                doing = "waiting for memory"
            else:
                doing = "done here"
            rate = format_rate(self.lines[name].rate(), self.decompressed[name].rate())
            # This worker may hold only part of a split archive; an ETA to
            # the end of the file is only honest when it holds all of it.
            eta = self.compressed[name].eta(size - at) if archive["whole"] else None
            result.append(
                f"progress {name} ({doing}): at {percent:.1f}% of"
                f" {size / 1e6:,.1f} MB compressed, {archive['lines']:,} records and"
                f" {archive['decompressed'] / 1e6:,.1f} MB decompressed here,"
                f" {rate}, {format_eta(eta)}; {memory}"
            )
        return result


def _report_forever() -> None:
    log = _WorkerLog()
    last_log = time.monotonic()
    while True:
        if _WAKE.wait(min(FILE_INTERVAL_SECS, _CONFIG["interval"])):
            _WAKE.clear()
            log = _WorkerLog()
        try:
            # The snapshot is taken under the write lock, so a file is never
            # replaced by an older one written by a reader's flush.
            with _WRITE_LOCK:
                state = snapshot()
                if _CONFIG["folder"]:
                    write_progress_file(_CONFIG["folder"], state)
            log.add(state)
            if time.monotonic() - last_log >= _CONFIG["interval"]:
                last_log = time.monotonic()
                level = logging.DEBUG if _CONFIG["folder"] else logging.INFO
                for line in log.lines_to_log(state):
                    _LOGGER.log(level, "%s", line)
        except Exception:  # A failed report must never end the worker.
            _LOGGER.exception("progress report failed")


def write_progress_file(folder: str, state: dict[str, Any]) -> None:
    """Writes this process's figures atomically (local folders only)."""
    if "://" in folder:
        return
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"worker-{state['pid']}.json")
    temporary = f"{target}.{threading.get_ident()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(temporary, target)
