"""The benchmark: the job and a plain loop, side by side on the same archives.

    python -m tests.bench.run            # archives of 2.5, 2.5, 6 and 12 GB
    python -m tests.bench.run --quick    # small archives, a few minutes
    python -m tests.bench.run --long     # a 40 GB archive in place of the 12 GB one

It generates the archives it needs with ``beam_pipeline.synth`` (one
``--long=31`` frame each, as the dumps), runs each program as a child
process of its own in turn, prints a table of records/s, MB/s (decompressed),
peak memory and CPU time with each ratio, checks the targets, and writes the
results as JSON and a plot of throughput and memory over the longest job run
under ``--results``. Generated archives and outputs are deleted at the end
unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from tests.bench.measure import Measurement, measure

__all__ = ["main"]

PROJECT_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
PYTHON = sys.executable

SUBREDDITS = ("AskMen", "AskWomen")
FIELDS = "id,author,subreddit,created_utc,body"
BATCH_SIZE = 1000
ONE_WORKER = ["--direct_num_workers=1"]
# The faster way to group what is left per key when a bundle ends.
FAST_LEFTOVERS = ["--leftover_grouping=group_by_key"]
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]

# Targets, as ratios measured in the same run.
SELECTIVE_TARGET = 0.9
FULL_TARGET = 0.5
TWO_WORKER_TARGET = 1.7
MEMORY_TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class Plan:
    """Archive sizes (decompressed bytes) of one benchmark mode."""

    name: str
    pair: int
    large: int
    huge: int | None
    note: str


PLANS = {
    "quick": Plan(
        "quick",
        300 * 10**6,
        800 * 10**6,
        None,
        "quick mode: archives of 0.3 and 0.8 GB, under the 2 GiB window, so start-up"
        " weighs on the rates and the memory comparison does not test a full window",
    ),
    "default": Plan(
        "default",
        2_500 * 10**6,
        6_000 * 10**6,
        12_000 * 10**6,
        "archives of 2.5 GB (two), 6 GB and 12 GB decompressed",
    ),
    "long": Plan(
        "long",
        2_500 * 10**6,
        6_000 * 10**6,
        40_000 * 10**6,
        "archives of 2.5 GB (two), 6 GB and 40 GB decompressed",
    ),
}


@dataclasses.dataclass
class Row:
    """One measured run, as a line of the table."""

    scenario: str
    program: str
    archives_bytes: int
    records: int
    written: int
    measurement: Measurement

    @property
    def records_per_sec(self) -> float:
        return self.records / self.measurement.wall_secs

    @property
    def mb_per_sec(self) -> float:
        return self.archives_bytes / 1e6 / self.measurement.wall_secs

    def as_dict(self) -> dict:
        m = self.measurement
        return {
            "scenario": self.scenario,
            "program": self.program,
            "decompressed_bytes": self.archives_bytes,
            "records": self.records,
            "written": self.written,
            "wall_secs": round(m.wall_secs, 3),
            "cpu_secs": round(m.cpu_secs, 3),
            "records_per_sec": round(self.records_per_sec, 1),
            "mb_per_sec": round(self.mb_per_sec, 1),
            "peak_rss_bytes": m.peak_rss,
            "max_process_rss_bytes": m.max_process_rss,
            "command": m.command,
        }


def _environment() -> dict:
    return dict(os.environ, NO_GCE_CHECK="true", PYTHONUNBUFFERED="1")


def _prism_binary() -> str | None:
    """A local Prism binary, or None: Beam must never download one."""
    candidates = [
        os.environ.get("PUSHSHIFT_PRISM_BIN", ""),
        os.path.join(PROJECT_ROOT, ".tools", "bin", "prism"),
        "/tmp/prismbuild/bin/prism",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Bench:
    """Generates archives, runs the programs and collects the rows."""

    def __init__(self, plan: Plan, workdir: str, results: str) -> None:
        self.plan = plan
        self.workdir = workdir
        self.results = results
        self.rows: list[Row] = []
        self.sizes: dict[str, int] = {}
        self.records: dict[str, int] = {}
        os.makedirs(workdir, exist_ok=True)
        os.makedirs(results, exist_ok=True)

    # Archives.

    def archive(self, name: str, size: int, seed: int) -> str:
        """A generated comments archive of ``size`` decompressed bytes."""
        path = os.path.join(self.workdir, name)
        meta = path + ".json"
        if os.path.exists(meta):
            with open(meta, encoding="utf-8") as handle:
                known = json.load(handle)
            if (
                known.get("size") == size
                and known.get("seed") == seed
                and os.path.exists(path)
            ):
                self.sizes[path] = known["decompressed_bytes"]
                self.records[path] = known["records"]
                return path
        month = name.split("_", 1)[1].split(".", 1)[0]
        started = time.perf_counter()
        # A process of its own: a 2 GiB-window compressor would otherwise
        # stay in this process's peak memory, which the measured programs
        # inherit in their kernel figures.
        code = (
            "import json, sys\n"
            "from beam_pipeline.synth import SynthSpec, generate\n"
            "spec = SynthSpec('comments', sys.argv[2], int(sys.argv[3]), None, int(sys.argv[4]))\n"
            "print(json.dumps(generate(sys.argv[1], spec)))\n"
        )
        made = subprocess.run(
            [PYTHON, "-c", code, path, month, str(size), str(seed)],
            cwd=PROJECT_ROOT,
            env=_environment(),
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(made.stdout.strip().splitlines()[-1])
        print(
            f"generated {name}: {result['records']:,} records,"
            f" {result['decompressed_bytes'] / 1e9:.2f} GB decompressed,"
            f" {os.path.getsize(path) / 1e6:,.0f} MB compressed,"
            f" in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        with open(meta, "w", encoding="utf-8") as handle:
            json.dump({"size": size, "seed": seed, **result}, handle)
        self.sizes[path] = result["decompressed_bytes"]
        self.records[path] = result["records"]
        return path

    # Programs.

    def _out(self, label: str) -> str:
        folder = os.path.join(self.workdir, "out", label)
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    def _log(self, label: str) -> str:
        return os.path.join(self.results, "logs", f"{label}.log")

    def _record(
        self, scenario, program, archives, records, written, measurement
    ) -> Row:
        measurement.check()
        row = Row(
            scenario,
            program,
            sum(self.sizes[a] for a in archives),
            records,
            written,
            measurement,
        )
        self.rows.append(row)
        print(
            f"  {scenario:<12} {program:<28} {measurement.wall_secs:7.1f} s"
            f" {row.records_per_sec:>10,.0f} rec/s {row.mb_per_sec:7.1f} MB/s"
            f" {measurement.peak_rss / 2**20:7,.0f} MiB",
            flush=True,
        )
        return row

    def zstd_cli(self, archive: str) -> Row:
        label = "zstd-d"
        os.makedirs(os.path.dirname(self._log(label)), exist_ok=True)
        command = ["sh", "-c", f"zstd -d --long=31 -c '{archive}' > /dev/null"]
        measurement = measure(command, env=_environment(), log_path=self._log(label))
        return self._record(
            "decompress",
            "zstd -d (CLI)",
            [archive],
            self.records[archive],
            0,
            measurement,
        )

    def zstd_pair(self, archives: list[str], at_once: bool) -> Row:
        """``zstd -d`` over several archives, one after another or all at once.

        At once, it shows how far the machine itself lets decompression
        scale over processes: the ceiling of the two-worker ratio.
        """
        label = "zstd-d-at-once" if at_once else "zstd-d-in-turn"
        joiner = " & " if at_once else "; "
        script = joiner.join(
            f"zstd -qd --long=31 -c '{archive}' > /dev/null" for archive in archives
        )
        if at_once:
            script += "; wait"
        measurement = measure(
            ["sh", "-c", script], env=_environment(), log_path=self._log(label)
        )
        return self._record(
            "two archives",
            "zstd -d, both at once" if at_once else "zstd -d, one after the other",
            archives,
            sum(self.records[archive] for archive in archives),
            0,
            measurement,
        )

    def python_decompress(self, archive: str) -> Row:
        label = "python-decompress"
        code = (
            "import sys, zstandard\n"
            "d = zstandard.ZstdDecompressor(max_window_size=2**31)\n"
            "with open(sys.argv[1], 'rb') as f:\n"
            "    r = d.stream_reader(f, read_size=2**20)\n"
            "    while r.read(2**20): pass\n"
        )
        measurement = measure(
            [PYTHON, "-c", code, archive], env=_environment(), log_path=self._log(label)
        )
        return self._record(
            "decompress",
            "python-zstandard alone",
            [archive],
            self.records[archive],
            0,
            measurement,
        )

    def reference(self, scenario: str, archives: list[str], selective: bool) -> Row:
        label = f"{scenario}-reference"
        output = self._out(label)
        command = [PYTHON, "-m", "tests.bench.reference", output, *archives]
        if selective:
            command += [f"--subreddit={name}" for name in SUBREDDITS] + [
                f"--fields={FIELDS}"
            ]
        measurement = measure(
            command, env=_environment(), cwd=PROJECT_ROOT, log_path=self._log(label)
        )
        measurement.check()
        counts = json.loads(measurement.output_tail.strip().splitlines()[-1])
        shutil.rmtree(output, ignore_errors=True)
        return self._record(
            scenario,
            "reference loop",
            archives,
            counts["read"],
            counts["written"],
            measurement,
        )

    def job(
        self,
        scenario: str,
        archives: list[str],
        selective: bool,
        runner_args: list[str],
        program: str,
    ) -> Row:
        label = f"{scenario}-{program.replace(' ', '-').replace(',', '')}"
        output = self._out(label)
        command = [
            PYTHON,
            "-m",
            "beam_pipeline",
            *(f"--input={path}" for path in archives),
            f"--output={output}",
        ]
        command += [f"--batch_size={BATCH_SIZE}", "--batch_key=subreddit", *runner_args]
        if selective:
            command += [f"--subreddit={name}" for name in SUBREDDITS] + [
                f"--fields={FIELDS}"
            ]
        measurement = measure(
            command,
            env=_environment(),
            cwd=PROJECT_ROOT,
            progress_dir=os.path.join(output, "_progress"),
            log_path=self._log(label),
        )
        measurement.check()
        with open(os.path.join(output, "_summary.json"), encoding="utf-8") as handle:
            summary = json.load(handle)
        shutil.rmtree(output, ignore_errors=True)
        row = self._record(
            scenario,
            program,
            archives,
            summary["records_read"],
            summary["records_written"],
            measurement,
        )
        row.summary = summary  # type: ignore[attr-defined]
        return row


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def run_plan(bench: Bench, plan: Plan, runners: list[str]) -> dict:
    """Runs every scenario of the plan; returns the targets' verdicts."""
    a = bench.archive("RC_2019-10.zst", plan.pair, seed=1)
    b = bench.archive("RC_2019-11.zst", plan.pair, seed=2)
    c = bench.archive("RC_2019-12.zst", plan.large, seed=3)
    huge = bench.archive("RC_2020-01.zst", plan.huge, seed=4) if plan.huge else None
    prism = _prism_binary()
    prism_args = (
        ["--runner=PrismRunner", f"--prism_location={prism}"] if prism else None
    )
    targets: dict = {}

    print("running (each program alone, one after another):", flush=True)
    bench.zstd_cli(a)
    bench.python_decompress(a)

    reference = bench.reference("selective", [a], selective=True)
    job = bench.job("selective", [a], True, ONE_WORKER, "job, 1 worker")
    _check_same(reference, job)
    targets["selective"] = _verdict(
        _ratio(job.records_per_sec, reference.records_per_sec),
        SELECTIVE_TARGET,
        "job / reference",
    )
    # What the name search saves: the same job parsing every line.
    thorough = bench.job(
        "selective",
        [a],
        True,
        [*ONE_WORKER, "--parse_all_lines"],
        "job, 1 worker, --parse_all_lines",
    )
    _check_same(reference, thorough)

    reference = bench.reference("full", [a], selective=False)
    judged = None
    if "direct" in runners:
        # Judged on the default: leftovers through GroupIntoBatches.
        judged = bench.job(
            "full",
            [a],
            False,
            ONE_WORKER,
            "job, 1 worker, leftovers by GroupIntoBatches",
        )
        _check_same(reference, judged)
        other = bench.job(
            "full",
            [a],
            False,
            [*ONE_WORKER, *FAST_LEFTOVERS],
            "job, 1 worker, leftovers by GroupByKey",
        )
        _check_same(reference, other)
    if "prism" in runners and prism_args:
        prism_row = bench.job("full", [a], False, prism_args, "job, Prism")
        _check_same(reference, prism_row)
        if judged is None:
            judged = prism_row
    if judged is not None:
        targets["full"] = _verdict(
            _ratio(judged.records_per_sec, reference.records_per_sec),
            FULL_TARGET,
            f"{judged.program} / reference",
        )

    in_turn = bench.zstd_pair([a, b], at_once=False)
    at_once = bench.zstd_pair([a, b], at_once=True)
    ceiling = _ratio(at_once.records_per_sec, in_turn.records_per_sec)
    one = bench.job("two archives", [a, b], True, ONE_WORKER, "job, 1 worker")
    two = bench.job("two archives", [a, b], True, TWO_WORKERS, "job, 2 workers")
    targets["two_workers"] = _verdict(
        _ratio(two.records_per_sec, one.records_per_sec),
        TWO_WORKER_TARGET,
        f"2 workers / 1 worker; this machine's own ceiling, zstd -d on both"
        f" archives at once / one after the other: {ceiling:.2f}",
    )
    # A worker decompresses ahead on a second core where one is spare; with
    # that off, each worker uses one core, and the ratio says how the job
    # scales with workers rather than with threads.
    inline = ["--read_ahead_blocks=0"]
    one = bench.job(
        "two archives", [a, b], True, ONE_WORKER + inline, "job, 1 worker, inline"
    )
    two = bench.job(
        "two archives", [a, b], True, TWO_WORKERS + inline, "job, 2 workers, inline"
    )
    targets["two_workers_inline"] = _verdict(
        _ratio(two.records_per_sec, one.records_per_sec),
        TWO_WORKER_TARGET,
        "2 workers / 1 worker, both with --read_ahead_blocks=0",
    )

    small = next(
        row
        for row in bench.rows
        if row.scenario == "selective" and row.program.startswith("job")
    )
    large = bench.job("memory", [c], True, ONE_WORKER, "job, 1 worker")
    growth = large.measurement.peak_rss / small.measurement.peak_rss - 1
    targets["memory"] = {
        "value": round(growth, 4),
        "target": MEMORY_TOLERANCE,
        "met": abs(growth) <= MEMORY_TOLERANCE,
        "what": (
            f"peak RSS over {bench.sizes[c] / 1e9:.1f} GB vs over {bench.sizes[a] / 1e9:.1f} GB,"
            " relative change"
        ),
    }
    targets["memory"]["formula_bytes"] = _decoder_formula(a)

    if huge:
        reference = bench.reference("realistic", [huge], selective=True)
        job = bench.job("realistic", [huge], True, ONE_WORKER, "job, 1 worker")
        _check_same(reference, job)
        targets["realistic"] = {
            "value": round(job.records_per_sec, 1),
            "met": job.written == reference.written,
            "what": (
                f"{bench.records[huge]:,} records, {bench.sizes[huge] / 1e9:.1f} GB: job records/s;"
                f" peak RSS {job.measurement.peak_rss / 2**20:,.0f} MiB;"
                f" {_ratio(job.records_per_sec, reference.records_per_sec):.2f} of the reference"
            ),
        }
    return targets


def _check_same(reference: Row, job: Row) -> None:
    """Raises RuntimeError unless both read and wrote the same number of records."""
    if (reference.records, reference.written) != (job.records, job.written):
        raise RuntimeError(
            f"{job.scenario}: {job.program} read {job.records:,} and wrote {job.written:,} records;"
            f" the reference read {reference.records:,} and wrote {reference.written:,}"
        )


def _verdict(value: float, target: float, what: str) -> dict:
    return {
        "value": round(value, 3),
        "target": target,
        "met": value >= target,
        "what": what,
    }


def _decoder_formula(archive: str) -> int:
    """The reader's reserved cost for an archive, from the memory guard's formula.

    Asked of a process of its own, which imports Beam, so that this one
    stays small.
    """
    code = (
        "import os, sys\n"
        "from transforms.memory import MemoryGuard\n"
        "from transforms.reader import ReaderConfig, archive_index\n"
        "config = ReaderConfig()\n"
        "index = archive_index(sys.argv[1], os.path.getsize(sys.argv[1]))\n"
        "print(MemoryGuard.decoder_cost(index, config.read_chunk_bytes,"
        " config.block_bytes, config.max_record_bytes, config.read_ahead_blocks))\n"
    )
    made = subprocess.run(
        [PYTHON, "-c", code, archive],
        cwd=PROJECT_ROOT,
        env=_environment(),
        check=True,
        capture_output=True,
        text=True,
    )
    return int(made.stdout.strip().splitlines()[-1])


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table, each with its ratio to its scenario's baseline."""
    lines = [
        "| scenario | program | GB | records | s | records/s | MB/s | peak RSS MiB | CPU s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = _baseline(rows, row)
        ratio = (
            f"{_ratio(row.records_per_sec, base.records_per_sec):.2f}" if base else ""
        )
        m = row.measurement
        lines.append(
            f"| {row.scenario} | {row.program} | {row.archives_bytes / 1e9:.2f} | {row.records:,} |"
            f" {m.wall_secs:.1f} | {row.records_per_sec:,.0f} | {row.mb_per_sec:,.0f} |"
            f" {m.peak_rss / 2**20:,.0f} | {m.cpu_secs:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def _baseline(rows: list[Row], row: Row) -> Row | None:
    """What a row's ratio is taken against: the reference, or one worker."""
    same = [other for other in rows if other.scenario == row.scenario]
    if row.scenario == "two archives":
        if row.program.startswith("zstd"):
            one = "zstd -d, one after the other"
        elif row.program.endswith("inline"):
            one = "job, 1 worker, inline"
        else:
            one = "job, 1 worker"
        return next((other for other in same if other.program == one), None)
    if row.scenario == "decompress":
        return next((other for other in same if other.program.startswith("zstd")), None)
    if row.scenario == "memory":
        return None
    return next((other for other in same if other.program == "reference loop"), None)


def format_targets(targets: dict) -> str:
    lines = []
    for name, verdict in targets.items():
        state = "met" if verdict["met"] else "NOT met"
        target = f" (target {verdict['target']})" if "target" in verdict else ""
        lines.append(f"- {name}: {verdict['value']}{target} {state}: {verdict['what']}")
        if "formula_bytes" in verdict:
            lines.append(
                f"  reader's reserved cost (window + read chunk + 3 + read-ahead blocks"
                f" + 2 max records):"
                f" {verdict['formula_bytes'] / 2**20:,.0f} MiB"
            )
    return "\n".join(lines)


def _machine() -> str:
    load = os.getloadavg()
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} cores, {memory:.0f} GiB, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def _longest_job(rows: list[Row]) -> Row | None:
    """The job run over the most bytes, the longest of those: the one to plot."""
    jobs = [
        row for row in rows if row.program.startswith("job") and row.measurement.samples
    ]
    return max(
        jobs,
        key=lambda row: (row.archives_bytes, row.measurement.wall_secs),
        default=None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run", description=__doc__.split("\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="Small archives, a few minutes."
    )
    mode.add_argument("--long", action="store_true", help="Add a 12 GB archive.")
    parser.add_argument(
        "--workdir",
        default="/tmp/pushshift-bench",
        help="Where archives and outputs go.",
    )
    parser.add_argument(
        "--results",
        default=os.path.join(PROJECT_ROOT, "out", "bench"),
        help="Where results go.",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="Keep the generated archives for another run.",
    )
    parser.add_argument(
        "--runners",
        default="direct",
        help="Runners for the full job: direct, prism or direct,prism (Prism is slow: see the docs).",
    )
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "long" if args.long else "default"]

    started = time.perf_counter()
    print(f"benchmark, {plan.note}; machine: {_machine()}", flush=True)
    bench = Bench(plan, args.workdir, args.results)
    try:
        targets = run_plan(bench, plan, args.runners.split(","))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    table = format_table(bench.rows)
    verdicts = format_targets(targets)
    if plan.name == "quick":
        # Start-up weighs on small archives and they do not fill the window:
        # the ratios are shown, the targets are judged on the default plan.
        verdicts = (
            "targets are judged on the default archives, not in quick mode:\n"
            + verdicts
        )
    print()
    print(table)
    print()
    print(verdicts)
    print(
        f"\nmachine after: {_machine()}; benchmark took {time.perf_counter() - started:.0f} s"
    )

    results = {
        "plan": dataclasses.asdict(plan),
        "machine": _machine(),
        "rows": [row.as_dict() for row in bench.rows],
        "targets": targets,
    }
    with open(
        os.path.join(args.results, "results.json"), "w", encoding="utf-8"
    ) as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(args.results, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(f"{plan.note}\n\n{table}\n\n{verdicts}\n")
    longest = _longest_job(bench.rows)
    if longest is not None:
        from tests.bench.plot import plot_run

        path = os.path.join(args.results, "long_run.png")
        plot_run(longest, path)
        print(f"plot of {longest.scenario} ({longest.program}): {path}")
    if plan.name == "quick":
        return 0
    return 0 if all(verdict["met"] for verdict in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
