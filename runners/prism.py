"""Beam's Prism runner, with a binary built here from Beam's Go module.

Launch: ``--runner=PrismRunner``. Beam starts the Prism binary as a local
job server and runs the Python workers in the launching process
(``--environment_type=LOOPBACK``, Beam's default for Prism). The binary is
``--prism_location``, else ``$PUSHSHIFT_PRISM_BIN``, else
``.tools/bin/prism`` (``make .tools/bin/prism`` builds it with
``go install``); without one the job stops before any work, since Beam
would otherwise download a release binary.

Prism streams between stages, fires ``GroupIntoBatches``' processing-time
timers on the wall clock and honours the reader's self-checkpoints with
their resume delay. On its own it also splits any bundle that reports no
progress between two progress polls (a running restriction in half, or the
elements not yet processed); but Prism 2.77 then releases the split-off
elements' keys while the first bundle still holds them, so a second bundle
of the same key runs at once and the two overwrite each other's keyed state
(``GroupIntoBatches`` loses and repeats records; a watermark timer fires
once per bundle). ``prepare`` therefore turns Prism's splitting off
(``--experiments=prism_disable_sdf_split``), which costs this job little:
the monthly dumps are single zstd frames, whose running restrictions
cannot be split anyway. ``--experiments=prism_enable_sdf_split`` keeps
Prism's splitting on.
"""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import (
    DebugOptions,
    PipelineOptions,
    PrismRunnerOptions,
)

from runners.tools import TOOLS_DIR, find_tool

__all__ = ["DEFAULTS", "ENV_VAR", "NAMES", "PROFILE_FLAGS", "make_runner", "prepare"]

NAMES = ("PrismRunner",)

# The environment variable that may name the Prism binary.
ENV_VAR = "PUSHSHIFT_PRISM_BIN"
DEFAULT_BINARY = os.path.join(TOOLS_DIR, "bin", "prism")

# Prism streams between stages, so fanning line blocks out to all cores
# costs no memory there.
DEFAULTS = {"fan_out": "on"}

PROFILE_FLAGS = ["--runner=PrismRunner", "--fan_out=on"]

# Prism's own experiment that stops it splitting bundles, and this job's
# marker (which Prism ignores) that leaves its splitting on.
DISABLE_SPLITS = "prism_disable_sdf_split"
KEEP_SPLITS = "prism_enable_sdf_split"


def prepare(options: PipelineOptions) -> None:
    """Points Beam at the local Prism binary and turns Prism's splits off.

    Raises OptionError without a usable binary.
    """
    debug = options.view_as(DebugOptions)
    experiments = debug.experiments or []
    if KEEP_SPLITS not in experiments and DISABLE_SPLITS not in experiments:
        debug.experiments = [*experiments, DISABLE_SPLITS]
    prism = options.view_as(PrismRunnerOptions)
    prism.prism_location = find_tool(
        "prism_location", prism.prism_location, ENV_VAR, DEFAULT_BINARY
    )
    if not os.access(prism.prism_location, os.X_OK):
        from beam_pipeline.options import OptionError

        raise OptionError(
            f"--prism_location {prism.prism_location!r} is not executable"
        )


def make_runner(options: PipelineOptions):
    """Beam's PrismRunner; ``prepare`` has named the binary in the options."""
    from apache_beam.runners.portability.prism_runner import PrismRunner

    return PrismRunner()
