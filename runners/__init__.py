"""How each runner is launched and configured for this job.

``runner_for(options)`` turns the ``--runner`` a user typed into what the
pipeline is run with; each runner module also names the option defaults
that suit this job there. The pipeline itself never branches on the runner.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from runners import direct

__all__ = ["runner_for", "runner_name"]


def runner_name(options: PipelineOptions) -> str:
    """The runner's short name, DirectRunner when none is given."""
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    if not isinstance(name, str):
        return type(name).__name__
    return name.rsplit(".", 1)[-1]


def runner_for(options: PipelineOptions):
    """The runner object or name to hand to ``beam.Pipeline``."""
    name = runner_name(options)
    if name in ("DirectRunner", "SwitchingDirectRunner"):
        return direct.make_runner(options)
    return options.view_as(StandardOptions).runner
