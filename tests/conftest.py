"""Shared fixtures: real samples, synthetic archives, an isolated output."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_GCE_CHECK", "true")

from beam_pipeline.synth import SynthSpec, generate  # noqa: E402
from tests.helpers import REAL_DATA  # noqa: E402


@pytest.fixture(scope="session")
def real_data() -> str:
    if not os.path.isdir(REAL_DATA):
        pytest.fail(
            f"the real samples are missing: {REAL_DATA} (see ../shared/data/README.md)"
        )
    return REAL_DATA


@pytest.fixture(scope="session")
def synthetic_archives(tmp_path_factory):
    """A factory of synthetic archives, each written once per session."""
    folder = tmp_path_factory.mktemp("synthetic")
    made: dict = {}

    def make(name: str, frame_bytes=None, window_log: int = 31, **spec) -> str:
        key = (name, frame_bytes, window_log, tuple(sorted(spec.items())))
        if key not in made:
            path = str(folder / name)
            generate(
                path, SynthSpec(**spec), frame_bytes=frame_bytes, window_log=window_log
            )
            made[key] = path
        return made[key]

    return make
