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


PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def git_commit(package_dir: Path = PACKAGE_DIR) -> str:
    """The commit of this project's checkout that the package is imported from (``src/deblur_diffusion``
    at the top of a git work tree with this project's ``pyproject.toml``), ``+dirty`` when files
    tracked there differ from it; ``unknown`` otherwise: an installed package, even one in a virtual
    environment inside some other git repository, whose commit is not this package's."""
    root = package_dir.parent.parent
    pyproject = root / "pyproject.toml"
    if package_dir.parent.name != "src" or not pyproject.is_file() or 'name = "deblur-diffusion"' not in pyproject.read_text():
        return UNKNOWN
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=package_dir, capture_output=True, text=True, timeout=10, check=True
        )
        if Path(top.stdout.strip()).resolve() != root.resolve():
            return UNKNOWN
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return commit.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def provenance() -> dict[str, str]:
    return {"version": package_version(), "commit": git_commit()}
