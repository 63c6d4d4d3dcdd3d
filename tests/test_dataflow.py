"""The Dataflow job description, built offline, and Dataflow's option checks.

Dataflow cannot be reached from here, so the job is written as a template
(``--template_location``) instead of being submitted: everything Beam
stages goes to a bucket of the local GCS emulator, the service endpoint is
a closed port on localhost (which also keeps Beam from checking buckets in
the cloud) and ``--no_auth`` keeps it from looking for credentials. Runner
v2 puts no steps in the template: the graph is the staged ``pipeline.pb``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import pytest
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    WorkerOptions,
)
from apache_beam.portability.api import beam_runner_api_pb2

from beam_pipeline.options import OptionError
from runners import dataflow, prepare_options
from runners.tools import PROJECT_ROOT
from tests.helpers import real_sample, run_cli
from tests.test_gcs import _free_port, gcs_emulator  # noqa: F401 (a fixture)

RC_FILES = ("RC_2005-12.zst", "RC_2006-01.zst")
BEAM_VERSION = "2.77.0"


@pytest.fixture(scope="module")
def template(gcs_emulator, real_data):  # noqa: F811
    """The job written as a Dataflow template, with what it staged."""
    root = gcs_emulator.bucket("dataflow")
    for name in RC_FILES:
        gcs_emulator.upload(real_sample(name), f"{root}/input/{name}")
    location = f"{root}/templates/pushshift.json"
    process = run_cli(
        [
            "--profile=dataflow",
            "--project=offline-project",
            "--region=europe-west1",
            f"--temp_location={root}/temp",
            f"--staging_location={root}/staging",
            f"--template_location={location}",
            f"--dataflow_endpoint=http://localhost:{_free_port()}",
            "--no_auth",
            "--job_name=pushshift-offline",
            f"--input={root}/input/RC_*.zst",
            f"--output={root}/out",
            "--subreddit=reddit.com",
            "--batch_size=100",
        ],
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    staged = gcs_emulator.paths(f"{root}/staging/")
    files = {path.rsplit("/", 1)[-1]: gcs_emulator.read(path) for path in staged}
    return root, json.loads(gcs_emulator.read(location)), staged, files


def test_template_is_a_runner_v2_job_on_the_chosen_workers(template):
    root, description, _, _ = template
    environment = description["environment"]
    [pool] = environment["workerPools"]

    assert "steps" not in description
    assert "use_runner_v2" in environment["experiments"]
    assert pool["machineType"] == dataflow.DEFAULT_MACHINE_TYPE == "n2-highmem-4"
    assert pool["diskSizeGb"] == dataflow.DEFAULT_DISK_GB == 50
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert pool["workerHarnessContainerImage"].endswith(
        f"beam_python{python}_sdk:{BEAM_VERSION}"
    )
    assert sorted(package["name"] for package in pool["packages"]) == [
        "submission_environment_dependencies.txt",
        "workflow.tar.gz",
    ]


def test_template_carries_the_job_options(template):
    root, description, _, _ = template
    options = description["environment"]["sdkPipelineOptions"]["options"]

    assert {name: options[name] for name in ("project", "region", "job_name")} == {
        "project": "offline-project",
        "region": "europe-west1",
        "job_name": "pushshift-offline",
    }
    # Beam gives the job a folder of its own under the temp location.
    assert options["temp_location"].startswith(f"{root}/temp/pushshift-offline.")
    assert options["input"] == [f"{root}/input/RC_*.zst"]
    assert options["output"] == f"{root}/out"
    assert options["subreddit"] == ["reddit.com"]
    assert options["batch_size"] == 100
    assert options["fan_out"] == "on"
    assert options["setup_file"] == os.path.join(PROJECT_ROOT, "setup.py")


def test_staged_graph_holds_the_jobs_steps(template):
    _, _, staged, files = template

    assert len({path.rsplit("/", 2)[-2] for path in staged}) == 1
    pipeline = beam_runner_api_pb2.Pipeline()
    pipeline.ParseFromString(files["pipeline.pb"])
    transforms = pipeline.components.transforms
    top = {transforms[name].unique_name for name in pipeline.root_transform_ids}
    top |= {
        transforms[part].unique_name
        for name in pipeline.root_transform_ids
        for part in transforms[name].subtransforms
    }
    assert {
        "Archives",
        "ReadArchives",
        "FanOut",
        "ParseRecords",
        "Batch",
        "AllDeadLetters",
        "WriteDeadLetters",
        "WriteDamage",
    } <= top
    assert any(name.startswith("HandOn") for name in top)

    splittable = []
    for transform in transforms.values():
        if transform.spec.urn == "beam:transform:pardo:v1":
            payload = beam_runner_api_pb2.ParDoPayload()
            payload.ParseFromString(transform.spec.payload)
            if payload.restriction_coder_id:
                splittable.append(transform.unique_name)
    assert splittable == ["ReadArchives/ParDo(ReadArchiveBlocks)"]


def test_package_is_staged_from_setup_py(template):
    _, _, _, files = template

    with tarfile.open(
        fileobj=io.BytesIO(files["workflow.tar.gz"]), mode="r:gz"
    ) as archive:
        members = {
            member.name.split("/", 1)[1]: member
            for member in archive.getmembers()
            if "/" in member.name
        }
        for name in ("setup.py", "pyproject.toml"):
            with open(os.path.join(PROJECT_ROOT, name), "rb") as handle:
                assert archive.extractfile(members[name]).read() == handle.read()
        requires = archive.extractfile(
            members["pushshift_beam.egg-info/requires.txt"]
        ).read()
    for module in (
        "beam_pipeline/cli.py",
        "beam_pipeline/pipeline.py",
        "transforms/reader.py",
        "transforms/sinks.py",
        "runners/dataflow.py",
    ):
        assert module in members
    # Workers install the dependencies that pyproject.toml names.
    installed = requires.decode("utf-8").split("\n\n")[0].splitlines()
    assert f"apache-beam[gcp]=={BEAM_VERSION}" in installed
    assert {line.split(">=")[0] for line in installed} >= {
        "zstandard",
        "orjson",
        "psutil",
    }


def _options(*flags: str) -> PipelineOptions:
    return PipelineOptions(
        [
            "--runner=DataflowRunner",
            "--project=p",
            "--region=r",
            "--temp_location=gs://b/tmp",
            "--input=gs://b/RC_*.zst",
            "--output=gs://b/out",
            *flags,
        ]
    )


def test_missing_dataflow_flags_fail_in_one_line_before_any_work(tmp_path):
    process = run_cli(
        [
            "--runner=DataflowRunner",
            f"--input={real_sample('RC_2005-12.zst')}",
            f"--output={tmp_path}",
        ]
    )

    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1] == (
        "error: DataflowRunner needs --project, --region, --temp_location"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--runner=DataflowRunner", "--project=p", "--temp_location=gs://b/t"],
            "DataflowRunner needs --region",
        ),
        (
            ["--temp_location=/tmp/local"],
            "--temp_location '/tmp/local' must be a gs:// path on DataflowRunner",
        ),
        (
            ["--staging_location=staging"],
            "--staging_location 'staging' must be a gs:// path on DataflowRunner",
        ),
        (
            ["--input=/data/RC_2019-10.zst"],
            "--input '/data/RC_2019-10.zst' is not on gs://; Dataflow workers cannot read this"
            " machine's files",
        ),
        (
            ["--output=out"],
            "--output 'out' is not on gs://; Dataflow workers cannot write this machine's files",
        ),
        (
            ["--worker_machine_type=n2-highcpu-2"],
            "--worker_machine_type n2-highcpu-2 has 2 GiB; an archive's decoder needs up to 2 GiB"
            " and buffers: choose one with at least 4 GiB (n2-highmem-4 is the default)",
        ),
        (
            ["--setup_file=/nowhere/setup.py"],
            "--setup_file '/nowhere/setup.py' is not a file",
        ),
    ],
)
def test_unusable_dataflow_options_are_named(flags, message):
    options = (
        PipelineOptions(flags) if flags[0].startswith("--runner") else _options(*flags)
    )

    with pytest.raises(OptionError) as refused:
        prepare_options(options)
    assert str(refused.value) == message


def test_dataflow_defaults_fill_only_what_the_user_left_out():
    defaulted = _options()
    chosen = _options("--worker_machine_type=n2-standard-8", "--disk_size_gb=100")
    container = _options("--sdk_container_image=europe-docker.pkg.dev/p/r/pushshift:1")

    for options in (defaulted, chosen, container):
        prepare_options(options)

    assert defaulted.view_as(WorkerOptions).machine_type == "n2-highmem-4"
    assert defaulted.view_as(WorkerOptions).disk_size_gb == 50
    assert defaulted.view_as(SetupOptions).setup_file == os.path.join(
        PROJECT_ROOT, "setup.py"
    )
    assert chosen.view_as(WorkerOptions).machine_type == "n2-standard-8"
    assert chosen.view_as(WorkerOptions).disk_size_gb == 100
    # An image of its own carries the package, so nothing is staged.
    assert container.view_as(SetupOptions).setup_file is None


@pytest.mark.parametrize(
    "machine_type, gib",
    [
        ("n2-highmem-4", 32.0),
        ("n1-standard-4", 15.0),
        ("e2-highcpu-8", 8.0),
        ("n2-custom-6-24576", 24.0),
        ("custom-2-6144-ext", 6.0),
        ("a2-ultragpu-1g", None),
    ],
)
def test_machine_memory_is_known_for_the_common_families(machine_type, gib):
    assert dataflow.machine_memory_gib(machine_type) == gib
