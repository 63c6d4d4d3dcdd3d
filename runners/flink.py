"""Beam's portable Flink runner."""

from __future__ import annotations

__all__ = ["DEFAULTS", "PROFILE_FLAGS"]

DEFAULTS = {"fan_out": "on"}
PROFILE_FLAGS = ["--environment_type=PROCESS", "--fan_out=on"]
