"""Google Cloud Dataflow."""

from __future__ import annotations

__all__ = ["DEFAULTS", "PROFILE_FLAGS"]

DEFAULTS = {"fan_out": "on"}
PROFILE_FLAGS = ["--setup_file=./setup.py", "--experiments=use_runner_v2", "--fan_out=on"]
