"""Beam's portable Flink runner, through Beam's Flink job server jar.

Launch: ``--runner=FlinkRunner``. Beam starts the job server jar with
``java -jar`` (Java 17 suits every Flink that Beam 2.77 supports) and hands
it the pipeline. The jar is ``--flink_job_server_jar``, else
``$PUSHSHIFT_FLINK_JAR``, else ``.tools/`` as the Makefile fetches it;
without one the job stops before any work, since Beam would otherwise
download it.

* ``--flink_master=[local]`` (or Beam's default ``[auto]``): the job server
  runs an embedded Flink in its own JVM, and the Python workers run in the
  launching process (``--environment_type=LOOPBACK``, set here when none is
  given).
* ``--flink_master=HOST:8081`` (a cluster's REST address): the task
  managers start the Python workers, so the environment must be one they
  can start: ``EXTERNAL`` with ``--environment_config=localhost:50000`` and
  ``python -m apache_beam.runners.worker.worker_pool_main
  --service_port=50000`` running beside each task manager (with this
  package installed there), ``PROCESS`` with a boot command installed on
  each, or ``DOCKER``. The jar's Flink version must be the cluster's.

The portable Flink runner splits restrictions initially (in the SDK) and
honours the reader's self-checkpoints; it issues no dynamic splits.
"""

from __future__ import annotations

import os
import re

from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
)

from runners.tools import TOOLS_DIR, find_tool

__all__ = [
    "BEAM_VERSION",
    "DEFAULTS",
    "DEFAULT_JAR",
    "ENV_VAR",
    "FLINK_VERSION",
    "JOB_SERVER_ARTIFACT",
    "NAMES",
    "PROFILE_FLAGS",
    "make_runner",
    "prepare",
]

NAMES = ("FlinkRunner",)

BEAM_VERSION = "2.77.0"
# Flink 1.20 is the last 1.x line, where Beam's portable batch translation
# is the long-standing one; it must match FLINK_VERSION in the Makefile.
FLINK_VERSION = "1.20"
JOB_SERVER_ARTIFACT = (
    f"org.apache.beam:beam-runners-flink-{FLINK_VERSION}-job-server:{BEAM_VERSION}"
)
DEFAULT_JAR = os.path.join(
    TOOLS_DIR, f"beam-runners-flink-{FLINK_VERSION}-job-server-{BEAM_VERSION}.jar"
)
# The environment variable that may name the job server jar.
ENV_VAR = "PUSHSHIFT_FLINK_JAR"

# Flink shuffles line blocks between task slots cheaply.
DEFAULTS = {"fan_out": "on"}

PROFILE_FLAGS = ["--runner=FlinkRunner", "--fan_out=on"]

# The masters that make the job server run Flink embedded in its JVM.
EMBEDDED_MASTERS = ("[local]", "[auto]")
_JAR_NAME = re.compile(r"beam-runners-flink-(\d+\.\d+)-job-server")


def prepare(options: PipelineOptions) -> None:
    """Names the local job server jar and a workable environment.

    Raises OptionError for a missing jar, or an environment that the Flink
    workers cannot start.
    """
    from beam_pipeline.options import OptionError

    flink = options.view_as(FlinkRunnerOptions)
    portable = options.view_as(PortableOptions)
    flink.flink_job_server_jar = find_tool(
        "flink_job_server_jar", flink.flink_job_server_jar, ENV_VAR, DEFAULT_JAR
    )
    named = _JAR_NAME.search(os.path.basename(flink.flink_job_server_jar))
    if named and named.group(1) in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS:
        flink.flink_version = named.group(1)

    master = (flink.flink_master or "[auto]").strip()
    if master in EMBEDDED_MASTERS:
        if not portable.environment_type:
            portable.environment_type = "LOOPBACK"
    elif not portable.environment_type:
        raise OptionError(
            f"--flink_master {master} is a cluster: give --environment_type EXTERNAL"
            " (a Beam worker pool beside each task manager), PROCESS or DOCKER"
        )
    if portable.environment_type.upper() in ("PROCESS", "EXTERNAL") and not (
        portable.environment_config or portable.environment_options
    ):
        raise OptionError(
            f"--environment_type {portable.environment_type} needs --environment_config"
            " (the boot command for PROCESS, the worker pool's address for EXTERNAL)"
        )


def make_runner(options: PipelineOptions):
    """Beam's FlinkRunner; ``prepare`` has named the jar in the options."""
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    return FlinkRunner()
