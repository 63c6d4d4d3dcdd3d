"""Named option sets for different machines and runners.

A profile is a list of command-line flags put before the user's own, so a
flag the user gives wins. ``--profile`` takes a name below or the path of a
JSON file holding an object of option names and values: ``true`` gives a
bare flag, a list repeats the flag once per item, ``false`` and ``null``
give nothing.
"""

from __future__ import annotations

import json
import os

from runners import RUNNERS, dataflow, direct, flink, prism

__all__ = ["PROFILES", "apply", "profile_flags", "runner_defaults"]

PROFILES: dict[str, tuple[str, list[str]]] = {
    "laptop": (
        "a laptop: DirectRunner on two worker processes, small buffers, 4 GiB bound",
        [*direct.PROFILE_FLAGS, "--max_memory_mb=4096", "--block_bytes=1048576"],
    ),
    "workstation": (
        "a large workstation: Prism on every core, 48 GiB bound, fan-out after reading",
        [*prism.PROFILE_FLAGS, "--max_memory_mb=49152", "--block_bytes=4194304"],
    ),
    "flink": (
        "Flink: portable FlinkRunner, embedded unless --flink_master names a cluster,"
        " fan-out after reading",
        list(flink.PROFILE_FLAGS),
    ),
    "dataflow": (
        "Google Cloud Dataflow: Runner v2 on n2-highmem-4 workers, setup.py staged,"
        " fan-out after reading",
        list(dataflow.PROFILE_FLAGS),
    ),
}


def runner_defaults(runner: str) -> dict:
    """Job option defaults that suit a runner (``fan_out`` and the like)."""
    module = RUNNERS.get(runner)
    return dict(module.DEFAULTS) if module is not None else {}


def _json_flags(value: str) -> list[str]:
    from beam_pipeline.options import OptionError

    try:
        with open(value, encoding="utf-8") as handle:
            settings = json.load(handle)
    except (OSError, ValueError) as exc:
        raise OptionError(
            f"--profile {value!r} is not a readable JSON file: {exc}"
        ) from None
    if not isinstance(settings, dict):
        raise OptionError(f"--profile {value!r} must hold a JSON object of options")
    flags = []
    for name, setting in settings.items():
        if name == "profile":
            raise OptionError(
                f"--profile {value!r} names another profile; profiles do not nest"
            )
        if setting is True:
            flags.append(f"--{name}")
        elif isinstance(setting, list):
            flags.extend(f"--{name}={item}" for item in setting)
        elif isinstance(setting, dict):
            raise OptionError(
                f"--profile {value!r}: option {name!r} holds an object, not a value"
            )
        elif setting is not False and setting is not None:
            flags.append(f"--{name}={setting}")
    return flags


def profile_flags(value: str) -> list[str]:
    """The flags of a named profile or a JSON profile file; raises OptionError."""
    from beam_pipeline.options import OptionError

    if value in PROFILES:
        return list(PROFILES[value][1])
    if os.path.isfile(value):
        return _json_flags(value)
    names = ", ".join(PROFILES)
    raise OptionError(
        f"--profile {value!r} is neither a profile ({names}) nor a JSON file"
    )


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
    return profile_flags(chosen) + arguments
