"""What the Hydra entry points share: where the configs are and how errors are reported."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.text import Text

from deblur_diffusion.errors import ConfigError, DeblurError

IMAGE_CHANNELS = 3
# ${with_prior:CHANNELS,FLAG}: CHANNELS, plus the 3 of a diffusion prior when FLAG is set (a prior
# folder, or true for the online prior); lets data and model configs agree on the input channels.
OmegaConf.register_new_resolver(
    "with_prior", lambda channels, flag: int(channels) + (IMAGE_CHANNELS if flag else 0), replace=True
)


def config_dir() -> str:
    """The ``conf/`` folder: ``$DEBLUR_DIFFUSION_CONF`` if set, else the one of this checkout."""
    candidate = Path(os.environ.get("DEBLUR_DIFFUSION_CONF", Path(__file__).resolve().parents[2] / "conf"))
    if not (candidate / "train.yaml").is_file():
        raise SystemExit(
            f"error: Hydra configs not found in {candidate}. Install the package in editable mode from its "
            "repository (make setup) or set DEBLUR_DIFFUSION_CONF to the repository's conf/ folder."
        )
    return str(candidate)


def require_complete(cfg: DictConfig, unused: tuple[str, ...] = ()) -> None:
    """Raises ConfigError naming every mandatory value (``???``) left unset, except under the
    ``unused`` key prefixes (parts of the config the entry point does not read)."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith(unused))
    if missing:
        raise ConfigError(
            "missing required config value(s): " + ", ".join(missing) + ". Set them on the command line, e.g. "
            + " ".join(f"{key}=..." for key in missing)
        )


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def report_errors(task: Callable) -> Callable:
    """Turns user-facing errors into a short message and exit status 1.

    Errors raised while Hydra builds an object from the config (a missing dataset, a bad option
    value) arrive wrapped in Hydra's InstantiationException; the message shown is the original one,
    with the config key that was being built.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except DeblurError as err:
            heading, message = "error: ", str(err)
        except InstantiationException as err:
            key = re.search(r"full_key: (\S+)", str(err))
            heading = f"error (building {key.group(1)}): " if key else "error: "
            message = str(_root_cause(err))
        Console(stderr=True).print(Text.assemble((heading, "bold red"), message), soft_wrap=True)
        sys.exit(1)

    return wrapper
