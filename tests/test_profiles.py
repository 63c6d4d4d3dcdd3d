"""Named and JSON profiles: what they set, what wins, and that each runs."""

from __future__ import annotations

import json

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    PrismRunnerOptions,
    StandardOptions,
    WorkerOptions,
)

from beam_pipeline.options import OptionError, PushshiftOptions
from runners import flink, prepare_options, prism, profiles
from tests.helpers import read_batches, real_sample, run, written_records


def _options(arguments: list[str]) -> PipelineOptions:
    return PipelineOptions(profiles.apply(arguments))


def test_a_named_profile_goes_before_the_users_flags():
    arguments = ["--profile", "laptop", "--input=RC_2019-10.zst"]

    assert profiles.apply(arguments) == [
        "--runner=DirectRunner",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
        "--max_memory_mb=4096",
        "--block_bytes=1048576",
        *arguments,
    ]
    assert profiles.apply(["--input=RC_2019-10.zst"]) == ["--input=RC_2019-10.zst"]


def test_flags_on_the_command_line_win_over_the_profile():
    options = _options(
        ["--profile=laptop", "--direct_num_workers=1", "--max_memory_mb=2048"]
    )

    assert options.view_as(DirectOptions).direct_num_workers == 1
    assert options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert options.view_as(PushshiftOptions).max_memory_mb == 2048
    assert options.view_as(PushshiftOptions).block_bytes == 2**20

    moved = _options(["--profile=workstation", "--runner=DirectRunner"])
    assert moved.view_as(StandardOptions).runner == "DirectRunner"
    assert moved.view_as(PushshiftOptions).fan_out == "on"


def test_a_json_profile_file_sets_options(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "runner": "PrismRunner",
                "batch_size": 250,
                "subreddit": ["AskMen", "AskWomen"],
                "tolerate_damage": True,
                "since": None,
                "restart": False,
            }
        )
    )

    assert profiles.profile_flags(str(path)) == [
        "--runner=PrismRunner",
        "--batch_size=250",
        "--subreddit=AskMen",
        "--subreddit=AskWomen",
        "--tolerate_damage",
    ]
    options = _options(
        [f"--profile={path}", "--batch_size=10", "--subreddit=AskReddit"]
    )
    job = options.view_as(PushshiftOptions)
    assert options.view_as(StandardOptions).runner == "PrismRunner"
    assert job.batch_size == 10
    # A repeated flag adds to the profile's values.
    assert job.subreddit == ["AskMen", "AskWomen", "AskReddit"]
    assert job.tolerate_damage is True
    assert job.since is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "--profile {path} must hold a JSON object of options"),
        (
            '{"profile": "laptop"}',
            "--profile {path} names another profile; profiles do not nest",
        ),
        (
            '{"runner": {"name": "PrismRunner"}}',
            "--profile {path}: option 'runner' holds an object, not a value",
        ),
    ],
)
def test_a_bad_json_profile_is_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)

    with pytest.raises(OptionError) as refused:
        profiles.apply([f"--profile={path}"])
    assert str(refused.value) == message.format(path=repr(str(path)))


def test_an_unreadable_json_profile_and_an_unknown_name_are_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")

    with pytest.raises(OptionError) as broken:
        profiles.apply([f"--profile={path}"])
    assert str(broken.value).startswith(
        f"--profile {str(path)!r} is not a readable JSON file: "
    )
    with pytest.raises(OptionError) as unknown:
        profiles.apply(["--profile=cluster"])
    assert str(unknown.value) == (
        "--profile 'cluster' is neither a profile (laptop, workstation, flink, dataflow) nor a JSON file"
    )


def test_runner_defaults_decide_the_fan_out():
    assert profiles.runner_defaults("DirectRunner") == {"fan_out": "off"}
    for runner in ("PrismRunner", "FlinkRunner", "DataflowRunner"):
        assert profiles.runner_defaults(runner) == {"fan_out": "on"}
    assert profiles.runner_defaults("SparkRunner") == {}


def test_the_workstation_profile_prepares_prism():
    options = _options(["--profile=workstation"])

    prepare_options(options)

    assert options.view_as(PrismRunnerOptions).prism_location is not None
    assert options.view_as(DebugOptions).experiments == [prism.DISABLE_SPLITS]
    assert options.view_as(PushshiftOptions).max_memory_mb == 49152


def test_the_flink_profile_prepares_an_embedded_flink(tmp_path, monkeypatch):
    jar = (
        tmp_path
        / f"beam-runners-flink-{flink.FLINK_VERSION}-job-server-{flink.BEAM_VERSION}.jar"
    )
    jar.write_bytes(b"")
    monkeypatch.setenv(flink.ENV_VAR, str(jar))
    options = _options(["--profile=flink"])

    prepare_options(options)

    assert options.view_as(StandardOptions).runner == "FlinkRunner"
    assert options.view_as(FlinkRunnerOptions).flink_job_server_jar == str(jar)
    assert options.view_as(PortableOptions).environment_type == "LOOPBACK"
    assert options.view_as(PushshiftOptions).fan_out == "on"


def test_the_dataflow_profile_needs_a_project_and_sets_the_workers():
    with pytest.raises(OptionError) as missing:
        prepare_options(_options(["--profile=dataflow"]))
    assert (
        str(missing.value)
        == "DataflowRunner needs --project, --region, --temp_location"
    )

    options = _options(
        [
            "--profile=dataflow",
            "--project=p",
            "--region=r",
            "--temp_location=gs://b/tmp",
            "--input=gs://b/RC_*.zst",
            "--output=gs://b/out",
            "--disk_size_gb=80",
        ]
    )
    prepare_options(options)
    assert options.view_as(WorkerOptions).machine_type == "n2-highmem-4"
    assert options.view_as(WorkerOptions).disk_size_gb == 80
    assert "use_runner_v2" in options.view_as(DebugOptions).experiments


@pytest.fixture(scope="module")
def reference_output(real_data, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("reference") / "out")
    run(
        [
            f"--input={real_sample('RC_2005-12.zst')}",
            f"--output={output}",
            "--batch_size=50",
        ]
    )
    return output


@pytest.mark.runners
@pytest.mark.parametrize("profile", ["laptop", "workstation"])
def test_a_profile_runs_the_job_as_the_defaults_do(profile, reference_output, tmp_path):
    output = str(tmp_path / "out")

    result = run(
        profiles.apply(
            [
                f"--profile={profile}",
                f"--input={real_sample('RC_2005-12.zst')}",
                f"--output={output}",
                "--batch_size=50",
            ]
        )
    )

    assert result["status"] == "succeeded"
    assert (
        result["runner"]
        == {"laptop": "DirectRunner", "workstation": "PrismRunner"}[profile]
    )
    assert (
        result["max_memory_bytes"]
        == {"laptop": 4096, "workstation": 49152}[profile] * 2**20
    )
    assert sorted(written_records(output)) == sorted(written_records(reference_output))
    assert sorted(map(len, read_batches(output).values())) == sorted(
        map(len, read_batches(reference_output).values())
    )
