"""A memory guard shared by the job's worker processes on one machine.

A zstd decoder for the dumps holds a window of up to 2 GiB, so a worker's
memory is decided by how many archives it opens at once. Before a decoder is
opened its cost is reserved in a ledger that every worker process of the job
on the machine shares (files under a lock in the temporary folder). A
reservation that would take the job past its bound is refused and the reader
defers; once it runs, the guard watches resident memory and slows intake
when buffers elsewhere grow near the bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from typing import Iterator, Optional

import psutil

from transforms import metrics
from transforms.zstd_frames import MAX_WINDOW_SIZE, FrameIndex

__all__ = ["MemoryGuard", "Reservation", "default_max_memory_bytes"]

_LOGGER = logging.getLogger(__name__)

# A worker throttles once resident memory passes this share of its bound.
THROTTLE_SHARE = 0.9
# How long one throttle pause lasts, and how often its warning is repeated.
THROTTLE_PAUSE_SECS = 0.5
THROTTLE_WARNING_SECS = 30.0
# Resident memory is sampled once per this many decompressed chunks.
_SAMPLE_EVERY = 8


def default_max_memory_bytes() -> int:
    """Three quarters of the memory available when the job starts."""
    return int(psutil.virtual_memory().available * 0.75)


class Reservation:
    """Bytes reserved in the ledger for one open decoder."""

    def __init__(self, guard: "MemoryGuard", path: Optional[str], size: int) -> None:
        self._guard = guard
        self._path = path
        self.size = size

    def release(self) -> None:
        if self._path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        self._path = None
        self._guard._opened(-self.size)


class MemoryGuard:
    """Reserves decoder memory against a bound and throttles near it."""

    _by_bound: dict[tuple[int, str], "MemoryGuard"] = {}
    _lock = threading.Lock()

    def __init__(self, max_bytes: int, ledger_key: str = "default") -> None:
        self.max_bytes = max_bytes
        digest = hashlib.sha256(ledger_key.encode("utf-8")).hexdigest()[:16]
        self._ledger = os.path.join(tempfile.gettempdir(), "pushshift-beam-memory", digest)
        self._process = psutil.Process()
        self._open_bytes = 0
        self._counter = 0
        self._sequence = 0
        self._last_warning = 0.0
        self.peak_rss = 0
        if max_bytes > 0:
            os.makedirs(self._ledger, exist_ok=True)
            self._register_member()

    @classmethod
    def for_worker(cls, max_bytes: int, ledger_key: str = "default") -> "MemoryGuard":
        """The guard of this process for a bound, made once."""
        with cls._lock:
            key = (max_bytes, ledger_key)
            if key not in cls._by_bound:
                cls._by_bound[key] = cls(max_bytes, ledger_key)
            return cls._by_bound[key]

    @staticmethod
    def decoder_cost(index: FrameIndex, read_chunk_bytes: int, block_bytes: int, max_record_bytes: int) -> int:
        """Bytes one open reader may hold: its window and its buffers.

        window (capped by the decompressed size where known), the compressed
        read buffer, up to three blocks in flight (the decoder's output, the
        line being completed and the block being emitted) and one record of
        the largest size allowed.
        """
        window = index.window_size or MAX_WINDOW_SIZE
        if index.source == "plain":
            window = 0
        elif index.decompressed_size is not None:
            window = min(window, index.decompressed_size)
        return window + read_chunk_bytes + 3 * block_bytes + max_record_bytes

    def _register_member(self) -> None:
        member = os.path.join(self._ledger, f"member-{os.getpid()}")
        with open(member, "w", encoding="ascii") as handle:
            handle.write(str(os.getpid()))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(os.path.join(self._ledger, "lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _ledger_state(self) -> tuple[int, int]:
        """(bytes reserved by live processes, their resident memory beyond it)."""
        reserved_by_pid: dict[int, int] = {}
        members: set[int] = set()
        for name in os.listdir(self._ledger):
            parts = name.split("-")
            if parts[0] not in ("member", "reserve"):
                continue
            pid = int(parts[1])
            if not psutil.pid_exists(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._ledger, name))
                continue
            members.add(pid)
            if parts[0] == "reserve":
                reserved_by_pid[pid] = reserved_by_pid.get(pid, 0) + int(parts[3])
        baseline = 0
        for pid in members:
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(pid).memory_info().rss
                baseline += max(rss - reserved_by_pid.get(pid, 0), 0)
        return sum(reserved_by_pid.values()), baseline

    def try_reserve(self, size: int, archive: str) -> Optional[Reservation]:
        """Reserves ``size`` bytes, or returns None if they do not fit now.

        Raises MemoryError when ``size`` alone exceeds the bound, since
        waiting would never let that archive be opened.
        """
        if self.max_bytes <= 0:
            self._opened(size)
            return Reservation(self, None, size)
        if size > self.max_bytes:
            raise MemoryError(
                f"{archive} needs {size / 2**20:.0f} MiB for its decoder window and"
                f" buffers, more than --max_memory_mb allows"
                f" ({self.max_bytes / 2**20:.0f} MiB)"
            )
        with self._locked():
            reserved, baseline = self._ledger_state()
            if reserved and reserved + size + baseline > self.max_bytes:
                metrics.MEMORY_DEFERRALS.inc()
                _LOGGER.info(
                    "deferring %s: its decoder needs %.0f MiB; %.0f MiB are reserved"
                    " and %.0f MiB used otherwise, of a %.0f MiB bound",
                    archive,
                    size / 2**20,
                    reserved / 2**20,
                    baseline / 2**20,
                    self.max_bytes / 2**20,
                )
                return None
            self._sequence += 1
            path = os.path.join(
                self._ledger, f"reserve-{os.getpid()}-{threading.get_ident()}.{self._sequence}-{size}"
            )
            with open(path, "w", encoding="ascii") as handle:
                handle.write(archive)
        self._opened(size)
        return Reservation(self, path, size)

    def _opened(self, change: int) -> None:
        with self._lock:
            self._open_bytes += change
            metrics.DECODER_WINDOWS.set(self._open_bytes)

    def sample(self) -> int:
        """Reports and returns this process's resident memory."""
        rss = self._process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        metrics.WORKER_RSS.update(rss)
        metrics.WORKER_RSS_NOW.set(rss)
        metrics.MACHINE_AVAILABLE.set(psutil.virtual_memory().available)
        return rss

    def throttle(self) -> None:
        """Pauses intake briefly while resident memory is near the bound."""
        self._counter += 1
        if self._counter % _SAMPLE_EVERY:
            return
        rss = self.sample()
        if self.max_bytes <= 0 or rss < THROTTLE_SHARE * self.max_bytes:
            return
        metrics.MEMORY_THROTTLES.inc()
        now = time.monotonic()
        if now - self._last_warning > THROTTLE_WARNING_SECS:
            self._last_warning = now
            beyond = rss - self._open_bytes
            cause = (
                "open decoder windows"
                if self._open_bytes >= beyond
                else "records and batches buffered after the reader"
            )
            _LOGGER.warning(
                "resident memory %.0f MiB is within %.0f%% of the %.0f MiB bound;"
                " decoders hold %.0f MiB, so most of it is %s; slowing intake",
                rss / 2**20,
                (1 - THROTTLE_SHARE) * 100,
                self.max_bytes / 2**20,
                self._open_bytes / 2**20,
                cause,
            )
        time.sleep(THROTTLE_PAUSE_SECS)
