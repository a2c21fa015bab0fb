"""What the Hydra entry points share: where the configs are and how errors are reported."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from deblur_diffusion.errors import ConfigError, DeblurError


def config_dir() -> str:
    """The ``conf/`` folder: ``$DEBLUR_DIFFUSION_CONF`` if set, else the one of this checkout."""
    candidate = Path(os.environ.get("DEBLUR_DIFFUSION_CONF", Path(__file__).resolve().parents[2] / "conf"))
    if not (candidate / "train.yaml").is_file():
        raise SystemExit(
            f"error: Hydra configs not found in {candidate}. Install the package in editable mode from its "
            "repository (make setup) or set DEBLUR_DIFFUSION_CONF to the repository's conf/ folder."
        )
    return str(candidate)


def require_complete(cfg: DictConfig) -> None:
    """Raises ConfigError naming every mandatory value (``???``) left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            "missing required config value(s): " + ", ".join(missing) + ". Set them on the command line, e.g. "
            + " ".join(f"{key}=..." for key in missing)
        )


def report_errors(task: Callable) -> Callable:
    """Turns the package's user-facing errors into a one-line message and exit status 1."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except DeblurError as err:
            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper
