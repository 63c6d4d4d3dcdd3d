"""A memory guard shared by the job's processes on one machine.

A zstd decoder for the dumps holds a window of up to 2 GiB (python-zstandard
allocates it when the frame starts; it becomes resident as output is
written into it, so after N bytes of output about min(N, window) is
resident, and it is freed only with the decompressor object). A worker's
memory is therefore decided by how many archives it has open at once.

Before a decoder is opened its cost (window plus the reader's buffers) is
reserved in a ledger that every process of the job on the machine shares:
small JSON files in a folder under the temporary directory, keyed by the
job's output, changed under an exclusive ``flock``. A reservation that
would take the job past its bound is refused; the reader asks again for a
moment, then defers (a self-checkpoint with a resume delay). On the
DirectRunner it waits in place instead: Beam's FnApiRunner drops deferred
work when it runs more than one worker. Running readers watch the job's
resident memory and slow their intake when it nears the bound, with a
warning that names the largest consumer.

The estimate a reservation is judged by, for each live member process::

    other  = max(idle RSS, RSS - its reservations)
    job    = sum(other) + sum(reservations)

``idle RSS`` is what the process used when it held no decoder (measured when
it joined and after each release). ``RSS - reservations`` alone would call a
process that just opened a 2 GiB window but has not yet filled it free of
any other memory; ``idle RSS`` alone would miss buffers that grew since.

Progress is guaranteed: a reservation is always granted when nothing else
is reserved, however little room the bound leaves, so a deferred reader
waits only for readers that are running and will release. A decoder whose
cost alone exceeds the bound can never be opened and fails at once with
``MemoryBoundTooSmall``. Entries of processes that died (checked by PID and
process start time, so a reused PID does not keep an entry alive) are
removed by whoever reads the ledger next.

The ledger covers processes that share a temporary folder and a PID
namespace: the SDK worker processes of one machine on the DirectRunner,
Prism and Flink's process environment. Where each worker runs in its own
container, each guards only itself; give ``--max_memory_mb`` per container
there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import psutil

from transforms import metrics
from transforms.zstd_frames import MAX_WINDOW_SIZE, FrameIndex

__all__ = [
    "AUTO_MAX_MEMORY",
    "LedgerState",
    "MemberState",
    "MemoryBoundTooSmall",
    "MemoryGuard",
    "Reservation",
    "TreeSampler",
    "default_max_memory_bytes",
    "ledger_folder",
    "peak_memory_bytes",
]

_LOGGER = logging.getLogger(__name__)

# ``max_bytes`` value that means: a share of the memory available on the
# machine the workers run on, decided by the first process of the job there.
AUTO_MAX_MEMORY = -1
# That share. The rest is left to the operating system, its page cache and
# whatever else runs on the machine.
DEFAULT_SHARE = 0.75
# Readers throttle once the job's resident memory passes this share of the
# bound.
THROTTLE_SHARE = 0.9
# Shortest and longest throttle pause, chosen by how far past the share
# memory is; the longest is reached at the bound.
THROTTLE_MIN_PAUSE_SECS = 0.2
THROTTLE_MAX_PAUSE_SECS = 2.0
# How often a throttling process repeats its warning.
THROTTLE_WARNING_SECS = 30.0
# How often a reader samples memory while it reads (about 100 MB of output
# at full speed).
SAMPLE_SECS = 0.5
# How often a waiting reader asks the ledger again before it defers.
_POLL_SECS = 0.2
# A reader refused for longer than this is reported at WARNING, naming who
# holds the memory, and again at the same interval while it waits.
LONG_WAIT_SECS = 600.0
# Refusals of one archive are logged at INFO at most this often.
_REFUSAL_LOG_SECS = 30.0
# Processes whose start times differ by less than this are the same process
# (start times are kept at the resolution of the kernel's clock ticks).
_START_TIME_SLACK_SECS = 1.0

MIB = 2**20
# The role of a process that launched the job and runs its workers too.
BOTH_ROLES = "launcher and worker"


# Where a memory cgroup states its limit and use: version 2, then version 1.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
    ),
)


def _cgroup_room(total: int) -> int | None:
    """Bytes this process's memory cgroup still allows, where it sets a limit.

    A container sees the whole machine's memory in ``/proc/meminfo``; its
    own limit is only in the cgroup files.
    """
    for limit_path, usage_path in _CGROUP_FILES:
        try:
            with open(limit_path, encoding="ascii") as handle:
                limit_text = handle.read().strip()
            if limit_text == "max":
                return None
            with open(usage_path, encoding="ascii") as handle:
                usage = int(handle.read().strip())
            limit = int(limit_text)
        except (OSError, ValueError):
            continue
        # Version 1 writes a huge number for "no limit".
        return max(limit - usage, 0) if limit < total else None
    return None


def default_max_memory_bytes() -> int:
    """The default bound: three quarters of the memory available now.

    Available means the machine's available memory or, inside a container
    with a memory limit, the room left under that limit, whichever is less.
    """
    memory = psutil.virtual_memory()
    available = memory.available
    room = _cgroup_room(memory.total)
    if room is not None:
        available = min(available, room)
    return int(available * DEFAULT_SHARE)


def ledger_folder(ledger_key: str) -> str:
    """Where the ledger of a job (named by its output) lives on this machine."""
    digest = hashlib.sha256(ledger_key.encode("utf-8")).hexdigest()[:16]
    user = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"pushshift-beam-memory-{user}", digest)


def peak_memory_bytes(
    baseline_bytes: int,
    window_bytes: int,
    archives_open: int,
    read_chunk_bytes: int,
    block_bytes: int,
    max_record_bytes: int,
    read_ahead_blocks: int = 0,
) -> int:
    """The reading side's peak memory, as docs/tuning.md gives it.

    Args:
        baseline_bytes: the processes' own memory (about 180 MiB per SDK
            worker process and 270 MiB for a local launcher, measured).
        window_bytes: the decoder window: the frame header's window size,
            capped by the largest frame's decompressed size where known.
        archives_open: how many archives are read at once.
        read_chunk_bytes: ``--read_chunk_bytes``.
        block_bytes: ``--block_bytes``.
        max_record_bytes: ``--max_record_bytes``.
        read_ahead_blocks: ``--read_ahead_blocks``.

    Returns:
        baseline + archives_open * (window + read chunk + (3 + read-ahead)
        blocks + 2 records), the figure the guard reserves against the bound.
    """
    blocks = (3 + read_ahead_blocks) * block_bytes
    per_archive = window_bytes + read_chunk_bytes + blocks + 2 * max_record_bytes
    return baseline_bytes + archives_open * per_archive


def resident_total(processes) -> int:
    """The resident memory of the processes still alive among these."""
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


class MemoryBoundTooSmall(ValueError):
    """A decoder needs more memory than the whole bound allows."""


def _process_start(pid: int) -> float | None:
    """The start time of a live process, or None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        # Not ours to inspect: alive, start time unknown.
        return -1.0


def _alive(pid: int, started: float) -> bool:
    """Whether the process that wrote an entry still runs."""
    now_started = _process_start(pid)
    if now_started is None:
        return False
    if now_started < 0 or started <= 0:
        return True
    return abs(now_started - started) < _START_TIME_SLACK_SECS


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: str, value: dict) -> None:
    """Writes a ledger entry whole or not at all (readers take no lock)."""
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    os.replace(temporary, path)


@dataclasses.dataclass(frozen=True)
class MemberState:
    """One live process of the job on this machine, as the ledger sees it."""

    pid: int
    role: str
    rss: int
    idle_rss: int
    reserved: int
    archives: tuple[str, ...]

    @property
    def other(self) -> int:
        """Memory not accounted to its decoders: max(idle, RSS - reserved)."""
        return max(self.idle_rss, self.rss - self.reserved)

    @property
    def grown(self) -> int:
        """Bytes beyond its idle memory that its decoders cannot explain."""
        return max(self.rss - self.idle_rss - self.reserved, 0)

    @property
    def decoders(self) -> int:
        """Bytes of its decoders that are resident now, at most."""
        return min(self.reserved, max(self.rss - self.idle_rss, 0))


@dataclasses.dataclass(frozen=True)
class LedgerState:
    """The job's processes on this machine and what they hold."""

    members: tuple[MemberState, ...]

    @property
    def reserved(self) -> int:
        return sum(member.reserved for member in self.members)

    @property
    def other(self) -> int:
        return sum(member.other for member in self.members)

    @property
    def rss(self) -> int:
        return sum(member.rss for member in self.members)

    @property
    def archives(self) -> tuple[str, ...]:
        return tuple(name for member in self.members for name in member.archives)

    def holders(self) -> str:
        """Who holds reservations, for messages."""
        held = [
            f"process {member.pid} ({', '.join(member.archives)}:"
            f" {member.reserved / MIB:,.0f} MiB)"
            for member in self.members
            if member.reserved
        ]
        return "; ".join(held) or "nobody"


class Reservation:
    """Bytes reserved in the ledger for one open decoder."""

    def __init__(
        self, guard: MemoryGuard, path: str | None, size: int, archive: str
    ) -> None:
        self._guard = guard
        self._path = path
        self._released = False
        self.size = size
        self.archive = archive

    def release(self) -> None:
        """Returns the bytes to the ledger; call after the decoder is freed."""
        if self._released:
            return
        self._released = True
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        self._guard._closed(self)


class MemoryGuard:
    """Reserves decoder memory against a bound and throttles near it.

    One guard per process and (bound, ledger key): get it with
    ``for_worker`` in a DoFn's ``setup`` or ``for_launcher`` in the process
    that starts a local job. A ``max_bytes`` of 0 or less than 0 other than
    ``AUTO_MAX_MEMORY`` turns the guard off (it still reports memory).
    """

    _by_key: dict[tuple[int, str], MemoryGuard] = {}
    _class_lock = threading.Lock()

    def __init__(
        self, max_bytes: int, ledger_key: str = "default", role: str = "worker"
    ) -> None:
        self._ledger = ledger_folder(ledger_key)
        self._root = os.path.dirname(self._ledger)
        self._ledger_key = ledger_key
        self.role = role
        self._lock = threading.Lock()
        self._open: dict[int, Reservation] = {}
        self._sequence = itertools.count(1)
        self._next_sample = 0.0
        self._last_warning = 0.0
        self._last_refusal_log: dict[str, float] = {}
        self._waiting_since: dict[str, float] = {}
        self._long_wait_warned: dict[str, float] = {}
        self._warned_overcommit = False
        self.peak_rss = 0
        self.requested_bytes = max_bytes
        self.max_bytes = max_bytes if max_bytes != AUTO_MAX_MEMORY else 0
        self._creator_pid = os.getpid()
        self._identity_cache: tuple[int, float] | None = None
        if self._uses_ledger:
            # Taking the lock joins the ledger: this process's idle memory is
            # measured now, before it opens any decoder.
            with self._locked():
                pass

    @property
    def _uses_ledger(self) -> bool:
        """Whether there is a bound, given or to be decided."""
        return self.requested_bytes > 0 or self.requested_bytes == AUTO_MAX_MEMORY

    @property
    def enabled(self) -> bool:
        """Whether reservations are checked against a bound."""
        return self.max_bytes > 0

    @classmethod
    def for_worker(cls, max_bytes: int, ledger_key: str = "default") -> MemoryGuard:
        """The guard of this process for a bound, made once."""
        return cls._shared(max_bytes, ledger_key, "worker")

    @classmethod
    def for_launcher(cls, max_bytes: int, ledger_key: str = "default") -> MemoryGuard:
        """The guard of the process that starts a local job; call ``leave`` at its end.

        The launcher joins the ledger before any worker starts, so the
        default bound is taken from the memory available before the job
        began, and its own memory (on the DirectRunner it holds what passes
        between stages) counts against the bound.
        """
        return cls._shared(max_bytes, ledger_key, "launcher")

    @classmethod
    def _shared(cls, max_bytes: int, ledger_key: str, role: str) -> MemoryGuard:
        with cls._class_lock:
            key = (max_bytes, ledger_key)
            guard = cls._by_key.get(key)
            if guard is None or guard._creator_pid != os.getpid():
                guard = cls(max_bytes, ledger_key, role)
                cls._by_key[key] = guard
            elif guard.role != role and guard.role != BOTH_ROLES:
                # The in-process DirectRunner: the launcher is the worker.
                guard.role = BOTH_ROLES
                if guard._uses_ledger:
                    with guard._locked():
                        guard._write_member(idle_rss=None)
            return guard

    @staticmethod
    def decoder_cost(
        index: FrameIndex,
        read_chunk_bytes: int,
        block_bytes: int,
        max_record_bytes: int,
        read_ahead_blocks: int = 0,
    ) -> int:
        """Bytes one open reader may hold: its window and its buffers.

        The window is the frame header's (2 GiB where a header gives none),
        capped by the largest frame's decompressed size where the sizes are
        known: zstd never keeps more history than a frame has. Then the
        compressed read buffer, three blocks (the decoder's output, the
        unfinished line joined to it and the block being emitted), the
        blocks decoded ahead, and two records of the largest size allowed
        (an unfinished line and its copy while a block is joined to it).
        """
        if index.source == "plain":
            window = 0
        else:
            window = index.window_size or MAX_WINDOW_SIZE
            largest_frame = _largest_frame(index)
            if largest_frame is not None:
                window = min(window, largest_frame)
        buffers = read_chunk_bytes + (3 + read_ahead_blocks) * block_bytes
        return window + buffers + 2 * max_record_bytes

    # The ledger.

    @property
    def _pid(self) -> int:
        return self._identity()[0]

    def _identity(self) -> tuple[int, float]:
        """(PID, start time) of this process, which together name it uniquely."""
        pid = os.getpid()
        cached = self._identity_cache
        if cached is None or cached[0] != pid:
            cached = (pid, _process_start(pid) or 0.0)
            self._identity_cache = cached
        return cached

    def _member_path(self, pid: int) -> str:
        return os.path.join(self._ledger, f"member-{pid}.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the ledger's lock, joining the ledger first if need be.

        A folder removed by a finished launcher is made again, so a guard
        that outlives one job still works for the next.
        """
        os.makedirs(self._root, mode=0o700, exist_ok=True)
        os.makedirs(self._ledger, mode=0o700, exist_ok=True)
        with open(os.path.join(self._ledger, "lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._join()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _join(self) -> None:
        """Writes this process's member entry and settles the bound (locked)."""
        pid, started = self._identity()
        if self.requested_bytes == AUTO_MAX_MEMORY and not self.max_bytes:
            self.max_bytes = self._settle_auto_bound(pid, started)
        if not os.path.exists(self._member_path(pid)):
            self._write_member(idle_rss=_rss(pid) if not self._open else 0)

    def _write_member(self, idle_rss: int | None) -> None:
        """Writes this process's entry; ``idle_rss`` None keeps the one written."""
        pid, started = self._identity()
        path = self._member_path(pid)
        if idle_rss is None:
            idle_rss = int((_read_json(path) or {}).get("idle_rss", 0) or 0)
        _write_json(
            path,
            {
                "pid": pid,
                "started": started,
                "role": self.role,
                "idle_rss": idle_rss,
                "key": self._ledger_key,
            },
        )

    def _settle_auto_bound(self, pid: int, started: float) -> int:
        """The default bound, shared: decided by the first process of the job.

        Later processes start when memory is already in use by the job, so
        they take the figure the first one wrote, unless nobody who was
        there when it was written is still alive (a ledger left by an
        earlier run).
        """
        path = os.path.join(self._ledger, "bound.json")
        entry = _read_json(path)
        if entry is not None and isinstance(entry.get("bytes"), int):
            writer_alive = _alive(
                int(entry.get("pid", -1)), float(entry.get("started", 0.0))
            )
            others = [
                member for member in self._scan(clean=True).members if member.pid != pid
            ]
            if writer_alive or others:
                return entry["bytes"]
        bound = default_max_memory_bytes()
        _write_json(path, {"bytes": bound, "pid": pid, "started": started})
        return bound

    def _scan(self, clean: bool) -> LedgerState:
        """The live members and their reservations; drops dead ones if ``clean``."""
        try:
            names = os.listdir(self._ledger)
        except FileNotFoundError:
            return LedgerState(())
        members: dict[int, dict] = {}
        reserved: dict[int, int] = {}
        archives: dict[int, list[str]] = {}
        for name in sorted(names):
            kind = name.split("-", 1)[0]
            if kind not in ("member", "reserve") or not name.endswith(".json"):
                continue
            path = os.path.join(self._ledger, name)
            entry = _read_json(path)
            if entry is None:
                continue
            try:
                pid, started = (
                    int(entry.get("pid", -1)),
                    float(entry.get("started", 0.0)),
                )
                size = int(entry.get("size", 0))
            except (TypeError, ValueError):
                # Not written by this module: none of its business.
                continue
            if not _alive(pid, started):
                if clean:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            if kind == "member":
                members[pid] = entry
            else:
                reserved[pid] = reserved.get(pid, 0) + size
                archives.setdefault(pid, []).append(str(entry.get("archive", "?")))
        states = []
        for pid in sorted(set(members) | set(reserved)):
            entry = members.get(pid, {})
            states.append(
                MemberState(
                    pid=pid,
                    role=str(entry.get("role", "worker")),
                    rss=_rss(pid),
                    idle_rss=int(entry.get("idle_rss", 0) or 0),
                    reserved=reserved.get(pid, 0),
                    archives=tuple(archives.get(pid, ())),
                )
            )
        return LedgerState(tuple(states))

    def state(self) -> LedgerState:
        """The job's processes on this machine now (read without the lock)."""
        if not self._uses_ledger:
            pid = os.getpid()
            return LedgerState(
                (MemberState(pid, self.role, _rss(pid), 0, self.open_bytes, ()),)
            )
        return self._scan(clean=False)

    def leave(self) -> None:
        """Takes this process out of the ledger; the last one out removes it.

        A launcher removes it in any case: its job has ended, and worker
        processes that are still exiting will reserve nothing more.
        """
        if not self._uses_ledger:
            return
        with self._class_lock:
            for key, guard in list(self._by_key.items()):
                if guard is self:
                    del self._by_key[key]
        with self._locked():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._member_path(self._pid))
            if self.role == "worker" and self._scan(clean=True).members:
                return
            for name in os.listdir(self._ledger):
                if name != "lock":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self._ledger, name))
        # The lock file goes last, outside the lock; a process that opens it
        # in between makes the folder again.
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self._ledger, "lock"))
            os.rmdir(self._ledger)

    # Reserving.

    def try_reserve(
        self,
        size: int,
        archive: str,
        wait_secs: float = 0.0,
        on_wait: Callable[[], None] | None = None,
    ) -> Reservation | None:
        """Reserves ``size`` bytes for a decoder of ``archive``, or returns None.

        Args:
            size: the decoder's cost, from ``decoder_cost``.
            archive: the archive's name, for the ledger and messages.
            wait_secs: how long to keep asking before giving up; ``math.inf``
                waits in place until the memory is free.
            on_wait: called once if the first answer is no.

        Returns:
            The reservation, to be released once the decoder is freed, or
            None when opening the decoder would still pass the bound after
            ``wait_secs``.

        Raises:
            MemoryBoundTooSmall: ``size`` alone exceeds the bound, so waiting
                would never let the archive be opened.
        """
        if not self._uses_ledger:
            return self._granted(None, size, archive)
        started = time.monotonic()
        deadline = started + wait_secs
        refused = False
        while True:
            reservation, state = self._reserve_once(size, archive)
            now = time.monotonic()
            if reservation is not None:
                self._waiting_since.pop(archive, None)
                if refused:
                    metrics.MEMORY_WAIT_MSECS.inc(int((now - started) * 1000))
                return reservation
            # Since when this archive waits, across deferrals too.
            since = self._waiting_since.setdefault(archive, now)
            if not refused:
                refused = True
                metrics.MEMORY_DEFERRALS.inc()
                self._log_refusal(size, archive, state)
                if on_wait is not None:
                    on_wait()
            last_warning = self._long_wait_warned.get(archive, since)
            if now - last_warning >= LONG_WAIT_SECS:
                self._long_wait_warned[archive] = now
                self._log_long_wait(size, archive, state, now - since)
            if now >= deadline:
                metrics.MEMORY_WAIT_MSECS.inc(int((now - started) * 1000))
                return None
            time.sleep(min(_POLL_SECS, deadline - now))

    def _too_small(self, size: int, archive: str) -> MemoryBoundTooSmall:
        other = self._scan(clean=False).other
        return MemoryBoundTooSmall(
            f"{archive}: its decoder needs {size / MIB:,.0f} MiB (window and"
            f" buffers), more than the whole bound of {self.max_bytes / MIB:,.0f} MiB;"
            f" raise --max_memory_mb to at least {-(-(size + other) // MIB):,} (the"
            f" decoder plus the {other / MIB:,.0f} MiB the job's processes use now),"
            f" or lower --max_record_bytes and --block_bytes"
        )

    def _reserve_once(
        self, size: int, archive: str
    ) -> tuple[Reservation | None, LedgerState]:
        with self._locked():
            if size > self.max_bytes:
                raise self._too_small(size, archive)
            state = self._scan(clean=True)
            reserved, other = state.reserved, state.other
            if reserved and reserved + other + size > self.max_bytes:
                return None, state
            if (
                not reserved
                and other + size > self.max_bytes
                and not self._warned_overcommit
            ):
                # Refusing here could wait forever: nothing reserved means no
                # reader will release memory. Open, and say so once.
                self._warned_overcommit = True
                _LOGGER.warning(
                    "opening %s although its decoder (%.0f MiB) and the job's other"
                    " memory (%.0f MiB) pass the %.0f MiB bound, since no other"
                    " decoder is open to wait for; raise --max_memory_mb or run"
                    " fewer workers",
                    archive,
                    size / MIB,
                    other / MIB,
                    self.max_bytes / MIB,
                )
            pid, started = self._identity()
            path = os.path.join(
                self._ledger, f"reserve-{pid}-{next(self._sequence)}.json"
            )
            _write_json(
                path,
                {
                    "pid": pid,
                    "started": started,
                    "archive": archive,
                    "size": size,
                    "since": time.time(),
                },
            )
        return self._granted(path, size, archive), state

    def _log_refusal(self, size: int, archive: str, state: LedgerState) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log.get(archive, -1e9) < _REFUSAL_LOG_SECS:
            return
        self._last_refusal_log[archive] = now
        _LOGGER.info(
            "%s waits for memory: its decoder needs %.0f MiB; %.0f MiB are reserved"
            " by %s and the job's processes use %.0f MiB besides, of a %.0f MiB"
            " bound",
            archive,
            size / MIB,
            state.reserved / MIB,
            state.holders(),
            state.other / MIB,
            self.max_bytes / MIB,
        )

    def _log_long_wait(
        self, size: int, archive: str, state: LedgerState, waited: float
    ) -> None:
        _LOGGER.warning(
            "%s has waited %.0f s for %.0f MiB of decoder memory under the %.0f MiB"
            " bound; held by %s; the job's processes use %.0f MiB besides. Raise"
            " --max_memory_mb or run fewer workers if this goes on",
            archive,
            waited,
            size / MIB,
            self.max_bytes / MIB,
            state.holders(),
            state.other / MIB,
        )

    def _granted(self, path: str | None, size: int, archive: str) -> Reservation:
        reservation = Reservation(self, path, size, archive)
        with self._lock:
            self._open[id(reservation)] = reservation
            open_bytes = sum(item.size for item in self._open.values())
        metrics.DECODER_WINDOWS.set(open_bytes)
        return reservation

    def _closed(self, reservation: Reservation) -> None:
        with self._lock:
            self._open.pop(id(reservation), None)
            idle = not self._open
            open_bytes = sum(item.size for item in self._open.values())
        metrics.DECODER_WINDOWS.set(open_bytes)
        if idle and self._uses_ledger:
            # With no decoder open, what the process holds now is its own:
            # the baseline its next reservations are judged by.
            if os.path.exists(self._member_path(self._pid)):
                with contextlib.suppress(OSError):
                    self._write_member(idle_rss=_rss(self._pid))

    @property
    def open_bytes(self) -> int:
        """Bytes this process has reserved for open decoders."""
        with self._lock:
            return sum(item.size for item in self._open.values())

    def open_reservations(self) -> list[tuple[str, int]]:
        """(archive, bytes) of this process's open decoders."""
        with self._lock:
            return [(item.archive, item.size) for item in self._open.values()]

    @classmethod
    def process_reservations(cls) -> list[tuple[str, int]]:
        """(archive, bytes) of the open decoders of every guard of this process."""
        with cls._class_lock:
            guards = list(cls._by_key.values())
        return [item for guard in guards for item in guard.open_reservations()]

    # Watching resident memory.

    def sample(self) -> int:
        """Reports this process's resident memory to the metrics; returns it."""
        rss = _rss(os.getpid())
        self.peak_rss = max(self.peak_rss, rss)
        metrics.WORKER_RSS.update(rss)
        metrics.WORKER_RSS_NOW.set(rss)
        metrics.MACHINE_AVAILABLE.set(psutil.virtual_memory().available)
        return rss

    def throttle(self) -> float:
        """Pauses intake while the job's resident memory is near the bound.

        Cheap to call for every chunk: it samples at most every
        ``SAMPLE_SECS``. Returns the seconds it paused.
        """
        now = time.monotonic()
        if now < self._next_sample:
            return 0.0
        self._next_sample = now + SAMPLE_SECS
        self.sample()
        if not self.enabled:
            return 0.0
        state = self.state()
        used = state.rss
        if used < THROTTLE_SHARE * self.max_bytes:
            return 0.0

        # The further past the share, the longer the pause: intake slows
        # smoothly and nearly stops at the bound.
        excess = (used / self.max_bytes - THROTTLE_SHARE) / (1 - THROTTLE_SHARE)
        pause = THROTTLE_MIN_PAUSE_SECS + (
            THROTTLE_MAX_PAUSE_SECS - THROTTLE_MIN_PAUSE_SECS
        ) * min(excess, 1.0)
        metrics.MEMORY_THROTTLES.inc()
        metrics.MEMORY_THROTTLED_MSECS.inc(int(pause * 1000))
        if now - self._last_warning >= THROTTLE_WARNING_SECS:
            self._last_warning = now
            _LOGGER.warning("%s", throttle_message(state, self.max_bytes))
        time.sleep(pause)
        self._next_sample = time.monotonic() + SAMPLE_SECS
        return pause


def throttle_message(state: LedgerState, max_bytes: int) -> str:
    """Says how near the bound the job's memory is and what pushed it there.

    The processes' own memory (measured with no decoder open) is a fixed
    cost; what fills the room above it is either decoder windows or memory
    a process gained since, and the larger of those is named as the cause,
    unless the fixed cost alone is near the bound.
    """
    decoders = sum(member.decoders for member in state.members)
    idle = sum(member.idle_rss for member in state.members)
    parts = [
        (
            decoders,
            f"decoder windows of {len(state.archives)} open archive(s)"
            f" ({', '.join(state.archives) or 'none'})",
        )
    ]
    for member in state.members:
        if member.role == "launcher":
            what = (
                f"data the launching process {member.pid} holds between stages"
                " (the DirectRunner keeps every matched record there until"
                " reading ends; a more selective filter or Prism helps)"
            )
        elif member.role == BOTH_ROLES:
            what = (
                f"records and batches held in process {member.pid}, which launched"
                " the job and runs its worker (a giant batch, a batch handler that"
                " keeps what it is given, or matched records kept between stages)"
            )
        else:
            what = (
                f"records and batches buffered in worker {member.pid} beyond its"
                " decoders (a giant batch, or a batch handler that keeps what it"
                " is given)"
            )
        parts.append((member.grown, what))
    largest, cause = max(parts, key=lambda part: part[0])
    if idle >= THROTTLE_SHARE * max_bytes or largest == 0:
        largest, cause = (
            idle,
            (
                f"the {len(state.members)} process(es) themselves (Python and Beam,"
                " measured with no decoder open): the bound leaves no room for this"
                " many workers"
            ),
        )
    return (
        f"resident memory of the job's processes is {state.rss / MIB:,.0f} MiB,"
        f" {100 * state.rss / max_bytes:.0f}% of the {max_bytes / MIB:,.0f} MiB"
        f" bound (--max_memory_mb): {idle / MIB:,.0f} MiB is the processes' own,"
        f" up to {decoders / MIB:,.0f} MiB decoder windows, and the largest part,"
        f" {largest / MIB:,.0f} MiB, is {cause}; slowing intake"
    )


def _largest_frame(index: FrameIndex) -> int | None:
    """The decompressed size of the largest frame, where sizes are known."""
    if index.decompressed_size is None:
        return None
    ends = (*index.decompressed_offsets[1:], index.decompressed_size)
    return max(
        end - start for start, end in zip(index.decompressed_offsets, ends, strict=True)
    )


class TreeSampler:
    """Samples the resident memory of this process and all its children.

    The launcher of a local run uses it for the summary's peak: on the
    DirectRunner and Prism the workers are its descendants, so the sum is
    the job's memory on the machine.
    """

    def __init__(self, interval_secs: float = 0.2) -> None:
        self._interval = interval_secs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak = 0

    def sample(self) -> int:
        """The tree's resident memory now; updates the peak."""
        own = psutil.Process()
        try:
            processes = [own, *own.children(recursive=True)]
        except psutil.Error:
            processes = [own]
        total = resident_total(processes)
        self.peak = max(self.peak, total)
        return total

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(
            target=self._run, name="memory-sampler", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stops sampling and returns the peak in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()
        return self.peak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)
