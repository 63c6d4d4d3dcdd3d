"""A plot of one job run: decompressed throughput and memory over time."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.bench.run import Row

__all__ = ["plot_run"]

# Throughput is taken over this many seconds of samples, since the workers
# rewrite their progress files only every two seconds.
RATE_SPAN_SECS = 10.0


def _rates(samples) -> tuple[list[float], list[float]]:
    """(times, MB/s) from samples of decompressed bytes so far."""
    points = [(s.secs, s.decompressed) for s in samples if s.decompressed is not None]
    times, rates = [], []
    start = 0
    for end in range(1, len(points)):
        while points[end][0] - points[start][0] > RATE_SPAN_SECS:
            start += 1
        span = points[end][0] - points[start][0]
        if span < RATE_SPAN_SECS / 2:
            continue
        times.append(points[end][0])
        rates.append((points[end][1] - points[start][1]) / span / 1e6)
    return times, rates


def plot_run(row: Row, path: str) -> None:
    """Writes a PNG of the run's throughput (MB/s) and tree RSS (MiB) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = row.measurement.samples
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    times, rates = _rates(samples)
    top.plot(times, rates, color="tab:blue")
    top.set_ylabel("decompressed MB/s")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    top.set_title(
        f"{row.scenario}: {row.program}, {row.archives_bytes / 1e9:.1f} GB,"
        f" {row.records:,} records, {row.measurement.wall_secs:.0f} s"
    )
    bottom.plot(
        [s.secs for s in samples], [s.rss / 2**20 for s in samples], color="tab:red"
    )
    bottom.set_ylabel("resident memory, MiB")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
