"""Named option sets for different machines and runners.

A profile is a list of command-line flags put before the user's own, so a
flag the user gives wins. ``--profile`` takes a name below or the path of a
JSON file holding an object of option names and values.
"""

from __future__ import annotations

import json
import os

from runners import dataflow, direct, flink, prism

__all__ = ["PROFILES", "apply", "runner_defaults"]

PROFILES: dict[str, tuple[str, list[str]]] = {
    "laptop": (
        "a laptop: DirectRunner on two workers, small buffers, 4 GiB bound",
        [
            "--runner=DirectRunner",
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
            "--max_memory_mb=4096",
            "--block_bytes=1048576",
        ],
    ),
    "workstation": (
        "a large workstation: Prism on every core, 48 GiB bound, fan-out after reading",
        [
            "--runner=PrismRunner",
            "--max_memory_mb=49152",
            "--block_bytes=4194304",
            "--fan_out=on",
        ],
    ),
    "flink": (
        "a Flink cluster: portable FlinkRunner, process workers, fan-out after reading",
        ["--runner=FlinkRunner", *flink.PROFILE_FLAGS],
    ),
    "dataflow": (
        "Google Cloud Dataflow: Runner v2, 2 GiB-window friendly machines, setup.py staged",
        ["--runner=DataflowRunner", *dataflow.PROFILE_FLAGS],
    ),
}

_RUNNER_DEFAULTS = {
    "DirectRunner": direct.DEFAULTS,
    "PrismRunner": prism.DEFAULTS,
    "FlinkRunner": flink.DEFAULTS,
    "DataflowRunner": dataflow.DEFAULTS,
}


def runner_defaults(runner: str) -> dict:
    """Job option defaults that suit a runner (``fan_out`` and the like)."""
    return _RUNNER_DEFAULTS.get(runner, {})


def _profile_flags(value: str) -> list[str]:
    from beam_pipeline.options import OptionError

    if value in PROFILES:
        return list(PROFILES[value][1])
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as handle:
                settings = json.load(handle)
        except (OSError, ValueError) as exc:
            raise OptionError(f"--profile {value!r} is not a readable JSON file: {exc}") from None
        if not isinstance(settings, dict):
            raise OptionError(f"--profile {value!r} must hold a JSON object of options")
        flags = []
        for name, setting in settings.items():
            if setting is True:
                flags.append(f"--{name}")
            elif isinstance(setting, list):
                flags.extend(f"--{name}={item}" for item in setting)
            elif setting is not False and setting is not None:
                flags.append(f"--{name}={setting}")
        return flags
    names = ", ".join(PROFILES)
    raise OptionError(f"--profile {value!r} is neither a profile ({names}) nor a JSON file")


def apply(arguments: list[str]) -> list[str]:
    """The arguments with the chosen profile's flags put first."""
    chosen = None
    for position, argument in enumerate(arguments):
        if argument == "--profile" and position + 1 < len(arguments):
            chosen = arguments[position + 1]
        elif argument.startswith("--profile="):
            chosen = argument.split("=", 1)[1]
    if chosen is None:
        return arguments
    return _profile_flags(chosen) + arguments
