"""Experiment loggers that need a decision at run time."""

from __future__ import annotations

import importlib.util
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

from deblur_diffusion.errors import ConfigError

_WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials_available() -> bool:
    """True when W&B can log in without asking: an API key in the environment or in the netrc
    file that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: the ``WANDB_MODE`` environment variable if set, else online when logged in and
    offline otherwise (runs are kept locally and can be uploaded later with ``wandb sync``)."""
    if mode not in _WANDB_MODES:
        raise ValueError(f"W&B mode must be one of {_WANDB_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_available() else "offline")


# Overrides that say where a run is, not what it is: left out of W&B run names and tags.
_PLACE_KEYS = ("hydra.", "paths.", "logger", "callbacks", "ckpt_path")
# W&B refuses longer tags.
_MAX_TAG_LENGTH = 64


def run_name_and_tags(name: str, overrides: Sequence[str]) -> tuple[str, list[str]]:
    """A W&B run's name and tags from its command-line overrides: ``name`` followed by what the run
    changed (``train lr=0.0012 patch_schedule=[[0,128,8]]``: the last part of each key), and one tag
    per override, so that the runs of a sweep can be told apart and filtered."""
    kept = [override.lstrip("+~") for override in overrides if not override.lstrip("+~").startswith(_PLACE_KEYS)]
    short = [f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (override.partition("=") for override in kept)]
    return " ".join([name, *short]), [override[:_MAX_TAG_LENGTH] for override in kept]


def wandb_logger(mode: str = "auto", overrides: Sequence[str] = (), **kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` that works without an account or network (offline mode), named
    and tagged from the run's ``overrides`` (:func:`run_name_and_tags`)."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs wandb, an optional dependency: pip install 'deblur-diffusion[loggers]'")
    resolved = resolve_wandb_mode(mode)
    kwargs["name"], tags = run_name_and_tags(kwargs.get("name") or "run", list(overrides))
    kwargs["tags"] = [*kwargs.get("tags", []), *tags]
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    if resolved == "disabled":
        kwargs["mode"] = "disabled"
    return WandbLogger(offline=resolved == "offline", **kwargs)
