"""Google Cloud Dataflow (Runner v2), with this package staged by setup.py.

Launch: ``--runner=DataflowRunner --project=P --region=R
--temp_location=gs://BUCKET/tmp`` with ``--input`` and ``--output`` on
``gs://``. Beam builds an sdist of this checkout from ``setup.py``
(``--setup_file``, set here), stages it as ``workflow.tar.gz`` beside the
pipeline graph (``pipeline.pb``) and submits the job; each worker
pip-installs it. ``--template_location=gs://...`` writes the job description
instead of submitting it.

Workers: a monthly dump's decoder holds a 2 GiB window, and Runner v2 runs
one Python process per vCPU, each reading several restrictions at once, so
the default machine is ``n2-highmem-4`` (4 vCPUs, 32 GiB: room for about ten
open windows under the job's memory bound, which each worker takes as three
quarters of its own machine's memory). The windows live in memory, not on
disk; the 50 GB disk holds the SDK container image, the installed package
and logs. Machine types with less than ``MIN_WORKER_MEMORY_GIB`` are refused.

Dataflow splits restrictions initially (in the SDK), honours the reader's
self-checkpoints and, on Runner v2, splits running restrictions dynamically
where the reader allows it (frame boundaries of seekable archives).
"""

from __future__ import annotations

import os
import re

from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    WorkerOptions,
)

from runners.tools import PROJECT_ROOT

__all__ = [
    "DEFAULTS",
    "DEFAULT_DISK_GB",
    "DEFAULT_MACHINE_TYPE",
    "MIN_WORKER_MEMORY_GIB",
    "NAMES",
    "PROFILE_FLAGS",
    "machine_memory_gib",
    "make_runner",
    "prepare",
]

NAMES = ("DataflowRunner",)

DEFAULTS = {"fan_out": "on"}

DEFAULT_MACHINE_TYPE = "n2-highmem-4"
DEFAULT_DISK_GB = 50
# One 2 GiB decoder window, its buffers and the Python worker itself.
MIN_WORKER_MEMORY_GIB = 4.0
SETUP_FILE = os.path.join(PROJECT_ROOT, "setup.py")

PROFILE_FLAGS = [
    "--runner=DataflowRunner",
    "--experiments=use_runner_v2",
    f"--worker_machine_type={DEFAULT_MACHINE_TYPE}",
    f"--disk_size_gb={DEFAULT_DISK_GB}",
    "--fan_out=on",
]

# GiB of memory per vCPU of Compute Engine's predefined machine families.
_GIB_PER_VCPU = {
    ("n1", "standard"): 3.75,
    ("n1", "highmem"): 6.5,
    ("n1", "highcpu"): 0.9,
    **{
        (family, "standard"): 4.0
        for family in ("n2", "n2d", "n4", "e2", "c3", "c3d", "c4", "t2d")
    },
    **{
        (family, "highmem"): 8.0
        for family in ("n2", "n2d", "n4", "e2", "c3", "c3d", "c4")
    },
    **{
        (family, "highcpu"): 1.0
        for family in ("n2", "n2d", "n4", "e2", "c3", "c3d", "c4")
    },
    ("c2", "standard"): 4.0,
    ("m1", "megamem"): 14.9,
}
_PREDEFINED = re.compile(r"^([a-z0-9]+)-([a-z]+)-(\d+)$")
_CUSTOM = re.compile(r"^(?:([a-z0-9]+)-)?custom-(\d+)-(\d+)(?:-ext)?$")


def machine_memory_gib(machine_type: str) -> float | None:
    """The memory of a Compute Engine machine type, None when not known here."""
    custom = _CUSTOM.match(machine_type)
    if custom:
        return int(custom.group(3)) / 1024
    predefined = _PREDEFINED.match(machine_type)
    if predefined:
        family, kind, vcpus = predefined.groups()
        per_vcpu = _GIB_PER_VCPU.get((family, kind))
        if per_vcpu is not None:
            return per_vcpu * int(vcpus)
    return None


def _is_gcs(path: str | None) -> bool:
    return bool(path) and path.startswith("gs://")


def prepare(options: PipelineOptions) -> None:
    """Checks what Dataflow needs and fills in this job's worker defaults.

    Raises OptionError naming the first missing or unusable flag.
    """
    from beam_pipeline.options import OptionError, PushshiftOptions

    cloud = options.view_as(GoogleCloudOptions)
    missing = [
        f"--{flag}"
        for flag in ("project", "region", "temp_location")
        if not getattr(cloud, flag)
    ]
    if missing:
        raise OptionError(f"DataflowRunner needs {', '.join(missing)}")
    # A local temp or staging folder would make Beam look for (or create) a
    # default bucket in the project before anything else.
    for flag in ("temp_location", "staging_location"):
        value = getattr(cloud, flag)
        if value and not _is_gcs(value):
            raise OptionError(
                f"--{flag} {value!r} must be a gs:// path on DataflowRunner"
            )

    job = options.view_as(PushshiftOptions)
    for pattern in job.input or []:
        if not _is_gcs(pattern):
            raise OptionError(
                f"--input {pattern!r} is not on gs://; Dataflow workers cannot read this machine's files"
            )
    for flag in ("output", "checkpoint_dir"):
        value = getattr(job, flag)
        if value and not _is_gcs(value):
            raise OptionError(
                f"--{flag} {value!r} is not on gs://; Dataflow workers cannot write this machine's files"
            )

    setup = options.view_as(SetupOptions)
    workers = options.view_as(WorkerOptions)
    if not setup.setup_file and not workers.sdk_container_image:
        setup.setup_file = SETUP_FILE
    if setup.setup_file and not os.path.isfile(setup.setup_file):
        raise OptionError(f"--setup_file {setup.setup_file!r} is not a file")

    if not workers.machine_type:
        workers.machine_type = DEFAULT_MACHINE_TYPE
    if not workers.disk_size_gb:
        workers.disk_size_gb = DEFAULT_DISK_GB
    memory = machine_memory_gib(workers.machine_type)
    if memory is not None and memory < MIN_WORKER_MEMORY_GIB:
        raise OptionError(
            f"--worker_machine_type {workers.machine_type} has {memory:g} GiB; an archive's decoder"
            f" needs up to 2 GiB and buffers: choose one with at least {MIN_WORKER_MEMORY_GIB:g} GiB"
            f" ({DEFAULT_MACHINE_TYPE} is the default)"
        )


def make_runner(options: PipelineOptions):
    """Beam's DataflowRunner."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    return DataflowRunner()
