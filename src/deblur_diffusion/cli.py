"""What the Hydra entry points share: where the configs are, the run's log file, and how errors are reported."""

from __future__ import annotations

import copy
import functools
import io
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console, RenderableType
from rich.text import Text

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.cluster import run_id
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.restorer import Restorer, pick_device
from deblur_diffusion.schemas import register_schemas
from deblur_diffusion.weights import LoadedNetwork, load_network

# ${with_prior:CHANNELS,FLAG}: CHANNELS, plus the 3 of a diffusion prior when FLAG is set (a prior
# folder, or true for the online prior); lets data and model configs agree on the input channels.
OmegaConf.register_new_resolver("with_prior", lambda channels, flag: int(channels) + (IMAGE_CHANNELS if flag else 0), replace=True)
# ${product:A,B}: A * B, e.g. a validation interval in optimisation steps times the accumulation
# (Lightning counts val_check_interval in micro-batches).
OmegaConf.register_new_resolver("product", lambda a, b: int(a) * int(b), replace=True)
# The run folder's name: the SLURM job or torchrun run when there is one (cluster.run_id).
# Cached: Lightning reads hydra.run.dir again when it starts the other ranks, which must get the same folder.
OmegaConf.register_new_resolver("run_id", run_id, replace=True, use_cache=True)


register_schemas()

# The package's messages for the run's log file (conf/hydra/job_logging/run_file.yaml). The null
# handler keeps them silent where logging is not configured, instead of Python's stderr fallback
# printing them a second time next to the Rich output.
RUN_LOG = logging.getLogger("deblur_diffusion")
RUN_LOG.addHandler(logging.NullHandler())


def show(console: Console, *renderables: RenderableType) -> None:
    """Prints a run's closing report (tables, lines) and writes it as plain text into the run's log file."""
    buffer = io.StringIO()
    plain = Console(file=buffer, width=120, color_system=None)
    for renderable in renderables:
        console.print(renderable, soft_wrap=True, highlight=False)
        plain.print(renderable, soft_wrap=True, highlight=False)
    RUN_LOG.info("\n%s", buffer.getvalue().rstrip())


def pass_lightning_messages_to_run_log() -> None:
    """Lightning, imported before Hydra configures logging, prints its messages through its own
    console handlers and stops them there; this gives them the current run's log file as well.
    The previous job's file is taken off first: in a sweep, every job has its own log."""
    run_files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        for handler in run_files:
            logger.addHandler(handler)


def config_dir() -> str:
    """The Hydra configs: ``$DEBLUR_DIFFUSION_CONF`` if set, else the ``conf/`` folder installed
    inside the package."""
    candidate = Path(os.environ.get("DEBLUR_DIFFUSION_CONF", Path(__file__).resolve().parent / "conf"))
    if not (candidate / "train.yaml").is_file():
        raise SystemExit(
            f"error: Hydra configs not found in {candidate}. Reinstall the package (its conf/ folder is part of it) "
            "or set DEBLUR_DIFFUSION_CONF to a folder laid out like src/deblur_diffusion/conf."
        )
    return str(candidate)


def unused_data_splits(cfg: DictConfig, split: str) -> tuple[str, ...]:
    """The ``data.<split>.`` key prefixes an entry point that reads one split does not read (for
    :func:`require_complete`): the others, but the training pairs when validation is held out of them."""
    held_out = split == "val" and cfg.data.get("val_fraction") is not None
    read = {"train"} if held_out else {split}
    return tuple(f"data.{other}." for other in ("train", "val", "test") if other not in read)


def require_complete(cfg: DictConfig, unused: tuple[str, ...] = ()) -> None:
    """Raises ConfigError naming every mandatory value (``???``) left unset, except under the
    ``unused`` key prefixes (parts of the config the entry point does not read)."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith(unused))
    if missing:
        raise ConfigError(
            "missing required config value(s): "
            + ", ".join(missing)
            + ". Set them on the command line, e.g. "
            + " ".join(f"{key}=..." for key in missing)
        )


def split_datamodule(cfg: DictConfig, split: str, **data_overrides):
    """The DataModule of ``cfg.data`` with only ``split`` built (the other splits may be incomplete
    or absent): how ``evaluate`` and ``generate_prior`` read pairs exactly as validation does.
    ``data_overrides`` replace keys of ``cfg.data`` before its interpolations are resolved. The
    training crop store (``data.prepared_dir``) is only opened for the train split."""
    held_out = split == "val" and cfg.data.get("val_fraction") is not None
    if cfg.data.get(split) is None and not held_out:
        raise ConfigError(f"the data config has no {split} split (data.{split} is null); try split=val")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.merge_with(data_overrides if split == "train" else {"prepared_dir": None, **data_overrides})
    # Resolved first: a split may be an interpolation of another (GoPro's test is its val).
    resolved = OmegaConf.to_container(cfg.data, resolve=True)
    # A validation split held out of the training pairs needs them.
    needed = {split, "train"} if held_out else {split}
    resolved.update({other: None for other in ("train", "val", "test") if other not in needed})
    if "train" not in needed:
        resolved["val_fraction"] = None
    return instantiate(OmegaConf.create(resolved))


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
        # Into the run's log file where there is one; elsewhere Hydra's console handler would print it twice.
        if any(isinstance(handler, logging.FileHandler) for handler in logging.getLogger().handlers):
            RUN_LOG.error("%s%s", heading, message)
        sys.exit(1)

    return wrapper


def weights_and_architecture(cfg: DictConfig) -> tuple[str | dict, dict | None]:
    """``cfg.ckpt`` and, when a model config was given (for official files), its network config;
    without one, ``cfg.architecture``'s values override what is read off an official file's weights
    (``architecture.window_size=8``: Swintormer's window, which no weight holds;
    ``+architecture.diffusion.timesteps=16``: HI-Diff's T)."""
    weights = OmegaConf.to_container(cfg.ckpt, resolve=True) if isinstance(cfg.ckpt, DictConfig) else cfg.ckpt
    if not cfg.get("model"):
        given = OmegaConf.to_container(cfg.architecture, resolve=True) if cfg.get("architecture") else {}
        overrides = {key: value for key, value in given.items() if value is not None}
        return weights, overrides or None
    missing = sorted(OmegaConf.missing_keys(cfg.model.net))
    if missing:
        raise ConfigError("missing required config value(s): " + ", ".join(f"model.net.{key}" for key in missing))
    return weights, OmegaConf.to_container(cfg.model.net, resolve=True)


def restorer_and_record(cfg: DictConfig) -> tuple[Restorer, LoadedNetwork]:
    """The entry points' model and the loaded network's record (source, SHA-256, views):
    ``cfg.ckpt`` (with ``cfg.model`` for official files), ``cfg.ema``, ``cfg.inference``,
    ``cfg.device`` and, for diffusion models, ``cfg.seed`` as the starting-noise seed."""
    weights, net_config = weights_and_architecture(cfg)
    loaded = load_network(weights, net_config, ema=bool(cfg.get("ema", True)), sha256=cfg.get("ckpt_sha256"))
    if cfg.get("seed") is not None and loaded.net.samples_noise:
        loaded.net.noise_seed = int(cfg.seed)
    inference = instantiate(cfg.inference)
    restorer = Restorer(
        loaded.net,
        inference,
        pick_device(cfg.device),
        loaded.weights,
        cfg.get("precision", "fp32"),
        loaded.views,
        cfg.get("backend", "torch"),
        loaded.net_config,
    )
    return restorer, loaded
