"""Where the runners' local tools (Prism, Flink's job server) are found."""

from __future__ import annotations

import os
import urllib.parse

__all__ = ["PROJECT_ROOT", "TOOLS_DIR", "find_tool", "is_url"]

# The checkout this package lies in; the Makefile builds tools under it.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_DIR = os.path.join(PROJECT_ROOT, ".tools")


def is_url(location: str) -> bool:
    """Whether a location is a URL (something Beam would download)."""
    scheme = urllib.parse.urlparse(location).scheme
    # A one-letter scheme is a Windows drive, not a URL.
    return len(scheme) > 1


def find_tool(flag: str, given: str | None, env_var: str, default: str) -> str:
    """The local file to use for a tool; raises OptionError if there is none.

    Args:
        flag: the Beam flag that names the tool (for messages).
        given: the flag's value, if the user gave one.
        env_var: an environment variable that may name the tool.
        default: where the Makefile puts the tool.

    Returns:
        An absolute path to an existing file.
    """
    from beam_pipeline.options import OptionError

    if given:
        if is_url(given):
            raise OptionError(
                f"--{flag} {given!r} is a URL; this job never downloads runner tools:"
                " name a local file"
            )
        if not os.path.isfile(given):
            raise OptionError(f"--{flag} {given!r} is not a file")
        return os.path.abspath(given)
    from_env = os.environ.get(env_var)
    if from_env:
        if not os.path.isfile(from_env):
            raise OptionError(
                f"{env_var}={from_env!r} is not a file (it names --{flag})"
            )
        return os.path.abspath(from_env)
    if os.path.isfile(default):
        return default
    raise OptionError(
        f"--{flag} is needed: no file at {default}; build or fetch it with"
        f" `make {os.path.relpath(default, PROJECT_ROOT)}`, or name one with {env_var}"
        f" or --{flag}"
    )
