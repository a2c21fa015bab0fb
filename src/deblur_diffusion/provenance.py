"""What made an artefact: the package's version and, run from a git checkout, its commit.

Recorded in every training checkpoint (``deblur_diffusion_provenance``), export ``config.yaml``
and ``summary.json`` (``provenance``), and printed when a training run starts.
"""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

UNKNOWN = "unknown"


def package_version() -> str:
    """The installed distribution's version (``pyproject.toml``), or ``unknown`` when the package
    runs from a source tree that was never installed."""
    try:
        return version("deblur-diffusion")
    except PackageNotFoundError:
        return UNKNOWN


@functools.cache
def git_commit() -> str:
    """The commit of the checkout this package is imported from, ``+dirty`` when files tracked
    there differ from it; ``unknown`` outside a checkout (an installed wheel) or without git."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return commit.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def provenance() -> dict[str, str]:
    return {"version": package_version(), "commit": git_commit()}
