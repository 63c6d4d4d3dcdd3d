"""The DirectRunner, run on Beam's FnApiRunner engine.

Beam's DirectRunner picks an engine per pipeline: Prism where the pipeline
allows it, else the FnApiRunner, else the older bundle-based runner. This
job's ``GroupIntoBatches`` declares a processing-time timer and combining
state, which sends the DirectRunner to the bundle-based engine, where a
splittable DoFn written as a generator fails its restriction checks. The
FnApiRunner runs the same batch pipeline correctly and much faster, so
``--runner=DirectRunner`` is run there, in process or, with
``--direct_running_mode=multi_processing``, over worker processes. Beam's
own choice of Prism is never made, so nothing is downloaded.

Launch: nothing to start; ``--direct_num_workers=N`` with
``--direct_running_mode=multi_processing`` (or ``multi_threading``) spreads
each stage's bundles over N workers.

The FnApiRunner runs one stage at a time and keeps what flows between
stages, and its state, in memory. Here that is the records left over per
key when a reading bundle ends, on their way through ``GroupIntoBatches``
(in the reading stage's state with one worker, between stages with more):
full batches are handed on while reading goes on, so a selective job holds
little, but a job that keeps every record of a large archive with many
small keys holds a good share of them (a quarter of a 2.5 GB full job,
docs/performance.md). For such jobs over archives larger than memory, use
a runner that streams between stages.

Splitting here: the reader's initial splits (done in the SDK, on every
runner) and its self-checkpoints are honoured, the checkpoint's resume delay
is not (a deferred restriction is retried at once); the runner issues no
dynamic splits of its own.
"""

from __future__ import annotations

import itertools

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

__all__ = ["DEFAULTS", "NAMES", "PROFILE_FLAGS", "make_runner", "prepare"]

# The --runner values this module runs.
NAMES = ("DirectRunner", "SwitchingDirectRunner")

# Option defaults that suit this job on the DirectRunner. Reshuffling line
# blocks would make the FnApiRunner hold every decompressed byte in memory
# before parsing, so blocks are parsed where they are read.
DEFAULTS = {"fan_out": "off"}

# Flags of the laptop profile: two worker processes, as many as a laptop's
# memory bound usually allows open 2 GiB decoder windows.
PROFILE_FLAGS = [
    "--runner=DirectRunner",
    "--direct_num_workers=2",
    "--direct_running_mode=multi_processing",
]


def prepare(options: PipelineOptions) -> None:
    """Checks the DirectRunner's options; nothing needs filling in."""
    from beam_pipeline.options import OptionError

    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers is not None and direct.direct_num_workers < 0:
        raise OptionError(
            f"--direct_num_workers must be 0 (one per core) or more, not {direct.direct_num_workers}"
        )


def make_runner(options: PipelineOptions):
    """A FnApiRunner that sees the pipeline options, as the DirectRunner's."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import worker_handlers
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # The in-process worker weighs every state cache entry by walking the
    # object graph, which for GroupIntoBatches' growing bags costs more
    # than it saves (measured: 22 s against 9 s on 170,000 records). Its
    # size is a module constant of Beam's worker handlers, read when the
    # worker starts. Worker processes already default to no cache
    # (--max_cache_memory_usage_mb=0).
    worker_handlers.STATE_CACHE_SIZE_MB = 0
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    runner_class = _runner_class()
    provision_info = _fn_runner().ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    )
    return runner_class(provision_info=provision_info)


def _fn_runner():
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    return fn_runner


_RUNNER_CLASS = None


def _runner_class():
    """The FnApiRunner with a parallel bundle manager that keeps checkpoints.

    With more than one worker, Beam 2.77's ``ParallelBundleManager`` splits a
    stage's input over the workers and merges their answers keeping only
    metrics and errors: the residuals of a self-checkpoint
    (``defer_remainder``, which the reader uses when a decoder's memory
    cannot be reserved) are dropped, and the rest of that archive silently
    goes unread. This subclass merges the residuals too.
    """
    global _RUNNER_CLASS
    if _RUNNER_CLASS is not None:
        return _RUNNER_CLASS

    from apache_beam.metrics import monitoring_infos
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.utils import thread_pool_executor

    fn_runner = _fn_runner()

    class CheckpointKeepingBundleManager(fn_runner.ParallelBundleManager):
        """Beam's parallel bundle manager, merging the parts' residuals."""

        def process_bundle(
            self,
            inputs,
            expected_outputs,
            fired_timers,
            expected_output_timers,
            dry_run=False,
        ):
            workers = self._num_workers
            parts: list[dict] = [{} for _ in range(workers)]
            for name, buffer in inputs.items():
                for position, part in enumerate(buffer.partition(workers)):
                    parts[position][name] = part
            # As in Beam's manager, fired timers go to the first worker only.
            timers = [
                fired_timers if position == 0 else {} for position in range(workers)
            ]

            def execute(part_and_timers):
                part, part_timers = part_and_timers
                manager = fn_runner.BundleManager(
                    self.bundle_context_manager,
                    self._progress_frequency,
                    cache_token_generator=self._cache_token_generator,
                )
                return manager.process_bundle(
                    part, expected_outputs, part_timers, expected_output_timers, dry_run
                )

            responses = []
            splits: list = []
            with thread_pool_executor.shared_unbounded_instance() as executor:
                for response, part_splits in executor.map(
                    execute, zip(parts, timers, strict=True)
                ):
                    responses.append(response)
                    splits.extend(part_splits)
            merged = beam_fn_api_pb2.InstructionResponse(
                process_bundle=beam_fn_api_pb2.ProcessBundleResponse(
                    residual_roots=[
                        root
                        for response in responses
                        for root in response.process_bundle.residual_roots
                    ],
                    monitoring_infos=monitoring_infos.consolidate(
                        itertools.chain.from_iterable(
                            response.process_bundle.monitoring_infos
                            for response in responses
                        )
                    ),
                    requires_finalization=any(
                        response.process_bundle.requires_finalization
                        for response in responses
                    ),
                ),
                error=next(
                    (response.error for response in responses if response.error), ""
                ),
            )
            return merged, splits

    class FnApiRunnerKeepingCheckpoints(fn_runner.FnApiRunner):
        """Beam's FnApiRunner, using the manager above where Beam uses its own."""

        def _get_bundle_manager(self, bundle_context_manager):
            manager = super()._get_bundle_manager(bundle_context_manager)
            if type(manager) is not fn_runner.ParallelBundleManager:
                return manager
            return CheckpointKeepingBundleManager(
                bundle_context_manager,
                self._progress_frequency,
                cache_token_generator=manager._cache_token_generator,
            )

    _RUNNER_CLASS = FnApiRunnerKeepingCheckpoints
    return _RUNNER_CLASS
