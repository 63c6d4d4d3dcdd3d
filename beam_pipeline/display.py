"""The live progress display of a local run, drawn from workers' reports.

Workers write their figures to ``OUTPUT/_progress`` every two seconds (and
when a pass over an archive ends); this display reads them and shows,
overall and per archive, the state, the percent read (compressed bytes
against the file size, since the dumps store no content size), records/s
and MB/s over the last half minute, an ETA from that recent rate (``--``
until there is enough history), and memory: the resident memory of the
job's processes against the bound, what the decoders hold, and what the
machine has available. On a terminal it redraws in place with rich;
otherwise it logs plain lines, with no control characters, every
``interval_secs`` and once more at the end.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import psutil

from transforms.memory import resident_total
from transforms.progress import RateWindow, format_eta, format_rate

__all__ = ["ProgressDisplay", "format_eta"]

_LOGGER = logging.getLogger("beam_pipeline.progress")

MIB = 2**20
# A terminal shows at most this many archive rows; a log at the end lists
# every archive only when there are at most this many.
_MAX_ROWS = 30


class _ArchiveView:
    """One archive's figures summed over workers, with its rate windows."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.compressed = RateWindow()
        self.decompressed = RateWindow()
        self.lines = RateWindow()
        self.state = "queued"
        self.logged_state = ""


class ProgressDisplay:
    """Shows progress from a folder of worker reports until stopped."""

    def __init__(
        self,
        folder: str,
        archive_sizes: dict[str, int],
        interval_secs: float,
        resumed_from: dict[str, int] | None = None,
        stream: TextIO | None = None,
        max_memory_bytes: int = 0,
    ) -> None:
        self._folder = folder
        self._interval = max(interval_secs, 0.1)
        self._resumed = resumed_from or {}
        self._stream = stream or sys.stderr
        self._bound = max_memory_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._views = {
            name: _ArchiveView(name, size) for name, size in archive_sizes.items()
        }
        self._overall_compressed = RateWindow()
        self._overall_decompressed = RateWindow()
        self._overall_lines = RateWindow()
        self._started = time.time()
        self.last_lines: list[str] = []
        self.peak_rss = 0

    def start(self) -> None:
        """Clears reports of an earlier run into the same folder and starts."""
        for path in glob.glob(os.path.join(self._folder, "worker-*.json")):
            try:
                os.unlink(path)
            except OSError:
                continue
        self._started = time.time()
        self._thread = threading.Thread(
            target=self._run, name="progress-display", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stops the display after showing the final figures."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _read_reports(self) -> list[dict[str, Any]]:
        reports = []
        for path in glob.glob(os.path.join(self._folder, "worker-*.json")):
            try:
                with open(path, encoding="utf-8") as handle:
                    report = json.load(handle)
            except (OSError, ValueError):
                # Replaced while being read; the next refresh reads it whole.
                continue
            if isinstance(report, dict) and report.get("time", 0) >= self._started - 1:
                reports.append(report)
        return reports

    def _job_rss(self, reports: list[dict[str, Any]]) -> int:
        """Resident memory of this process, its children and reporting workers."""
        own = psutil.Process()
        processes = [own]
        try:
            processes += own.children(recursive=True)
        except psutil.Error:
            pass
        seen = {process.pid for process in processes}
        for report in reports:
            pid = report.get("pid", -1)
            if pid not in seen and psutil.pid_exists(pid):
                try:
                    processes.append(psutil.Process(pid))
                    seen.add(pid)
                except psutil.Error:
                    continue
        return resident_total(processes)

    def lines(self, final: bool = False, every_row: bool = False) -> list[str]:
        """The current figures as text lines, the overall line first.

        Args:
            final: the run has ended: every archive is shown, and one not
                read to its end is shown as stopped.
            every_row: show every archive, not only those being read,
                waiting, or changed since the last call.
        """
        now = time.time()
        reports = self._read_reports()
        totals: dict[str, dict[str, int]] = collections.defaultdict(
            lambda: {
                "compressed": 0,
                "decompressed": 0,
                "lines": 0,
                "active": 0,
                "waiting": 0,
                "passes_done": 0,
            }
        )
        decoders: dict[str, int] = collections.defaultdict(int)
        for report in reports:
            for archive in report.get("archives", []):
                entry = totals[archive.get("name", "?")]
                for key in entry:
                    entry[key] += int(archive.get(key, 0))
            for decoder in report.get("decoders", []):
                decoders[decoder.get("archive", "?")] += int(decoder.get("bytes", 0))
        rss = self._job_rss(reports)
        self.peak_rss = max(self.peak_rss, rss)
        available = psutil.virtual_memory().available

        rows = []
        sums = {"size": 0, "done": 0, "decompressed": 0, "lines": 0}
        states: collections.Counter[str] = collections.Counter()
        for name, view in self._views.items():
            entry = totals.get(name, {})
            done = min(entry.get("compressed", 0), view.size)
            view.compressed.add(now, done)
            view.decompressed.add(now, entry.get("decompressed", 0))
            view.lines.add(now, entry.get("lines", 0))
            view.state = self._state(view, entry, done, final)
            states[view.state] += 1
            sums["size"] += view.size
            sums["done"] += done
            sums["decompressed"] += entry.get("decompressed", 0)
            sums["lines"] += entry.get("lines", 0)

            percent = 100.0 * done / view.size if view.size else 100.0
            reading = view.state == "reading"
            resumed = " (resumed)" if name in self._resumed else ""
            if reading:
                rate = format_rate(view.lines.rate(), view.decompressed.rate())
                eta = format_eta(view.compressed.eta(view.size - done))
                memory = (
                    f", decoder {decoders[name] / MIB:,.0f} MiB"
                    if decoders.get(name)
                    else ""
                )
                detail = f"{rate}, {eta}{memory}"
            else:
                detail = (
                    f"{entry.get('lines', 0):,} records,"
                    f" {entry.get('decompressed', 0) / 1e6:,.1f} MB decompressed"
                )
            row = f"  {name}{resumed}: {view.state} {percent:5.1f}%, {detail}"
            changed = view.state != view.logged_state
            if (
                final
                or every_row
                or reading
                or view.state == "waiting for memory"
                or changed
            ):
                rows.append(row)
            view.logged_state = view.state

        self._overall_compressed.add(now, sums["done"])
        self._overall_decompressed.add(now, sums["decompressed"])
        self._overall_lines.add(now, sums["lines"])
        percent = 100.0 * sums["done"] / sums["size"] if sums["size"] else 100.0
        if final:
            rate = format_rate(
                sums["lines"] / max(now - self._started, 1e-9),
                sums["decompressed"] / max(now - self._started, 1e-9),
            )
            eta_text = "finished"
        else:
            rate = format_rate(
                self._overall_lines.rate(), self._overall_decompressed.rate()
            )
            eta_text = format_eta(
                self._overall_compressed.eta(sums["size"] - sums["done"])
            )
        counts = ", ".join(
            f"{count} {state}" for state, count in sorted(states.items())
        )
        bound = f" of a {self._bound / MIB:,.0f} MiB bound" if self._bound > 0 else ""
        overall = (
            f"progress {percent:5.1f}% of {len(self._views)} archive(s) ({counts}):"
            f" {sums['lines']:,} records, {sums['decompressed'] / 1e6:,.0f} MB"
            f" decompressed in {now - self._started:,.0f} s, {rate}, {eta_text};"
            f" memory {rss / MIB:,.0f} MiB{bound},"
            f" decoders {sum(decoders.values()) / MIB:,.0f} MiB,"
            f" available {available / MIB:,.0f} MiB"
        )
        if len(rows) > _MAX_ROWS:
            # Many archives: the ones not done matter, and a screenful of them.
            rows = [row for row in rows if ": done " not in row][:_MAX_ROWS]
        return [overall, *rows]

    @staticmethod
    def _state(
        view: _ArchiveView, entry: dict[str, int], done: int, final: bool
    ) -> str:
        if entry.get("active"):
            return "reading"
        if done >= view.size and entry.get("passes_done"):
            return "done"
        if entry.get("waiting"):
            return "waiting for memory"
        if final:
            return "stopped" if entry.get("passes_done") else "not read"
        return "started" if entry.get("passes_done") else "queued"

    def _run(self) -> None:
        if self._stream.isatty():
            self._run_live()
            return
        while not self._stop.wait(self._interval):
            self._log(self.lines())
        self._log(self.lines(final=True))

    def _log(self, lines: list[str]) -> None:
        self.last_lines = lines
        for line in lines:
            _LOGGER.info("%s", line)

    def _run_live(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        console = Console(file=self._stream)
        with Live(
            Text(""), console=console, refresh_per_second=2, transient=False
        ) as live:
            while not self._stop.wait(min(self._interval, 2.0)):
                self.last_lines = self.lines(every_row=True)
                live.update(Text("\n".join(self.last_lines)))
            self.last_lines = self.lines(final=True)
            live.update(Text("\n".join(self.last_lines)))
