"""The live progress display of a local run, drawn from workers' reports.

Workers write their figures to ``OUTPUT/_progress`` every two seconds; this
display reads them and shows, overall and per archive, the percent read
(compressed bytes against the file size, since the dumps store no content
size), the rate, an ETA from the recent rate, and memory. On a terminal it
redraws in place with rich; otherwise it logs plain lines.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import threading
import time
from typing import Optional

import psutil

from transforms.progress import RateWindow

__all__ = ["ProgressDisplay", "format_eta"]

_LOGGER = logging.getLogger("beam_pipeline.progress")


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "ETA --"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"ETA {hours}h{minutes:02d}m"
    if minutes:
        return f"ETA {minutes}m{secs:02d}s"
    return f"ETA {secs}s"


class ProgressDisplay:
    """Shows progress from a folder of worker reports until stopped."""

    def __init__(
        self,
        folder: str,
        archive_sizes: dict[str, int],
        interval_secs: float,
        resumed_from: Optional[dict[str, int]] = None,
        stream=None,
    ) -> None:
        self._folder = folder
        self._sizes = archive_sizes
        self._interval = interval_secs
        self._resumed = resumed_from or {}
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._windows: dict[str, RateWindow] = {name: RateWindow() for name in archive_sizes}
        self._overall = RateWindow()
        self._started = time.time()
        self.last_lines: list[str] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="progress-display", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _read_reports(self) -> tuple[dict[str, dict], int]:
        """Per-archive sums over workers, and the workers' resident memory."""
        totals: dict[str, dict] = {name: {"compressed": 0, "decompressed": 0} for name in self._sizes}
        rss = 0
        for path in glob.glob(os.path.join(self._folder, "worker-*.json")):
            try:
                with open(path, encoding="utf-8") as handle:
                    report = json.load(handle)
            except (OSError, ValueError):
                continue
            if report.get("pid") != os.getpid() and psutil.pid_exists(report.get("pid", -1)):
                rss += report.get("rss", 0)
            for archive in report.get("archives", []):
                entry = totals.setdefault(archive["name"], {"compressed": 0, "decompressed": 0})
                entry["compressed"] += archive["compressed"]
                entry["decompressed"] += archive["decompressed"]
        return totals, rss

    def lines(self) -> list[str]:
        """The current figures as text lines, the overall line first."""
        now = time.time()
        totals, worker_rss = self._read_reports()
        launcher_rss = psutil.Process().memory_info().rss
        rss = launcher_rss + worker_rss
        available = psutil.virtual_memory().available

        rows = []
        total_size = total_done = total_decompressed = 0
        for name, size in self._sizes.items():
            done = min(totals.get(name, {}).get("compressed", 0), size)
            decompressed = totals.get(name, {}).get("decompressed", 0)
            total_size += size
            total_done += done
            total_decompressed += decompressed
            window = self._windows[name]
            window.add(now, decompressed)
            rate = window.rate()
            compressed_window = self._windows.setdefault(name + "\0c", RateWindow())
            compressed_window.add(now, done)
            eta = compressed_window.eta(size - done) if done < size else 0.0
            percent = 100.0 * done / size if size else 100.0
            resumed = " (resumed)" if name in self._resumed else ""
            rows.append(
                f"  {name}{resumed}: {percent:5.1f}%"
                f" {(rate or 0) / 1e6:7.1f} MB/s {format_eta(eta if rate else None)}"
            )

        self._overall.add(now, total_done)
        percent = 100.0 * total_done / total_size if total_size else 100.0
        eta = self._overall.eta(total_size - total_done)
        elapsed = now - self._started
        overall = (
            f"progress {percent:5.1f}% of {len(self._sizes)} archive(s),"
            f" {total_decompressed / 1e6:,.0f} MB decompressed in {elapsed:,.0f} s,"
            f" {format_eta(eta)}, RSS {rss / 2**20:,.0f} MiB,"
            f" available {available / 2**20:,.0f} MiB"
        )
        return [overall, *rows]

    def _run(self) -> None:
        if self._stream.isatty():
            self._run_live()
            return
        while not self._stop.wait(self._interval):
            self.last_lines = self.lines()
            for line in self.last_lines:
                _LOGGER.info("%s", line)

    def _run_live(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        console = Console(file=self._stream)
        with Live(Text(""), console=console, refresh_per_second=2, transient=False) as live:
            while not self._stop.wait(min(self._interval, 2.0)):
                self.last_lines = self.lines()
                live.update(Text("\n".join(self.last_lines)))
