"""Beam's Prism runner, with a binary built here from Beam's Go module."""

from __future__ import annotations

__all__ = ["DEFAULTS"]

# Prism streams between stages, so fanning line blocks out to all cores
# costs no memory there.
DEFAULTS = {"fan_out": "on"}
