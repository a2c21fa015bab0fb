"""Experiment loggers that need a decision at run time."""

from __future__ import annotations

import importlib.util
import netrc
import os
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


def wandb_logger(mode: str = "auto", **kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` that works without an account or network (offline mode)."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs wandb, an optional dependency: pip install 'deblur-diffusion[loggers]'")
    resolved = resolve_wandb_mode(mode)
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    if resolved == "disabled":
        kwargs["mode"] = "disabled"
    return WandbLogger(offline=resolved == "offline", **kwargs)
