"""Setup shim so Dataflow workers can install the job with --setup_file.

The metadata and dependencies live in pyproject.toml.
"""

from setuptools import setup

setup()
