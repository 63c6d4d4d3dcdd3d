"""How each runner is launched and configured for this job.

``runner_for(options)`` turns the ``--runner`` a user typed into what the
pipeline is run with; ``prepare_options(options)`` checks that runner's
options and fills in what it needs here (the local Prism binary, Flink's job
server jar, Dataflow's setup file and workers), so that Beam never downloads
a tool itself. Each runner module also names the option defaults that suit
this job there. The pipeline itself never branches on the runner.
"""

from __future__ import annotations

from types import ModuleType

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from runners import dataflow, direct, flink, prism

__all__ = ["RUNNERS", "module_for", "prepare_options", "runner_for", "runner_name"]

# Every runner this job is run on, by the short names --runner takes.
RUNNERS: dict[str, ModuleType] = {
    name: module for module in (direct, prism, flink, dataflow) for name in module.NAMES
}


def runner_name(options: PipelineOptions) -> str:
    """The runner's short name, DirectRunner when none is given."""
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    if not isinstance(name, str):
        return type(name).__name__
    return name.rsplit(".", 1)[-1]


def module_for(options: PipelineOptions) -> ModuleType:
    """The module of the chosen runner; raises OptionError for another runner."""
    from beam_pipeline.options import OptionError

    name = runner_name(options)
    if name not in RUNNERS:
        known = ", ".join(sorted(RUNNERS))
        raise OptionError(f"--runner {name} is not one this job runs on ({known})")
    return RUNNERS[name]


def prepare_options(options: PipelineOptions) -> None:
    """Checks the runner's options and fills in its settings; raises OptionError.

    Changes ``options`` in place. Safe to call more than once.
    """
    module_for(options).prepare(options)


def runner_for(options: PipelineOptions):
    """The runner object to hand to ``beam.Pipeline``; raises OptionError."""
    module = module_for(options)
    module.prepare(options)
    return module.make_runner(options)
