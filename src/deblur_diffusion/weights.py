"""Reading a trained network from any file it comes in, for inference.

Three kinds of weights load through :func:`load_network`:

* a Lightning checkpoint of this project (``.ckpt``): the network's config travels inside it; the
  EMA weights are used when the run kept them (``ema=False``: the raw weights);
* an export folder of ``python -m deblur_diffusion.export`` (``model.safetensors`` + ``config.yaml``);
* the official release files (``.pth`` holding ``{'params': ...}``), which carry no config: a
  Restormer or Swintormer file's architecture is read off its weights
  (:mod:`deblur_diffusion.models.detect`); a network config given with it wins (e.g. the ``net``
  node of ``conf/model/restormer.yaml``), and one without ``_target_`` overrides what was read.
  Models made of several files (HI-Diff: ``net_g``, ``net_le_dm``, ``net_d``) take a mapping from
  the network's part to its file, e.g. ``{transformer: net_g.pth, condition_encoder: net_le_dm.pth,
  denoiser: net_d.pth}``; their architecture is read off them too, but for the diffusion schedule
  (the release's of the variant, unless given, e.g. ``{diffusion: {timesteps: 4}}``).

Writing that release format is :func:`deblur_diffusion.export.save_official`; starting a training
stage from weights is :mod:`deblur_diffusion.stages.warm_start`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from deblur_diffusion.checkpoints import (
    CheckpointError,
    load_weights,
    official_weights,
    read_checkpoint,
    stage_weights,
)
from deblur_diffusion.models.detect import infer_network_config, infer_parts_config

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


@dataclass
class LoadedNetwork:
    """A network ready for inference, with the config that builds it.

    ``weights`` says which weights were loaded: ``"ema"`` or ``"raw"`` (a checkpoint of this
    package or an export of it), or the key of the official file (``params_ema``, ``params``;
    one per file, comma-separated, for several files).
    """

    net: nn.Module
    net_config: dict
    inference_config: dict = field(default_factory=dict)
    source: str = ""
    weights: str = ""


def _as_dict(config) -> dict:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def _build(net_config: Mapping, source: str) -> nn.Module:
    if "_target_" not in net_config:
        raise CheckpointError(f"{source}: the network config has no _target_ (got keys {sorted(net_config)})")
    return instantiate(OmegaConf.create(dict(net_config)), _convert_="all")


def _lightning_network(path: Path, ema: bool) -> LoadedNetwork:
    checkpoint = read_checkpoint(path)
    config = checkpoint.get("deblur_diffusion_config")
    if "state_dict" not in checkpoint or not config:
        raise CheckpointError(f"{path} is not a checkpoint written by deblur_diffusion.train (no saved config)")
    net_config = config["model"]["net"]
    net = _build(net_config, str(path))
    weights, used_ema = stage_weights(checkpoint, "net", ema, str(path))
    kind = "ema" if used_ema else "raw"
    load_weights(net, weights, f"{path} ({kind} weights)")
    return LoadedNetwork(net, net_config, config.get("inference", {}), str(path), kind)


def _exported_network(path: Path) -> LoadedNetwork:
    folder = path if path.is_dir() else path.parent
    weights, config_file = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    for required in (weights, config_file):
        if not required.is_file():
            raise CheckpointError(f"{folder} is not an export folder: {required.name} is missing")
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    net = _build(config["net"], str(config_file))
    load_weights(net, load_file(weights), str(weights))
    return LoadedNetwork(net, config["net"], config.get("inference", {}), str(folder), str(config.get("weights", "")))


def _official_network(files: str | Path | Mapping[str, str], net_config: Mapping | None, ema: bool) -> LoadedNetwork:
    """Official release files. ``net_config`` with a ``_target_`` is the architecture; without one
    (or None) the architecture is read off the weights
    (:mod:`~deblur_diffusion.models.detect`) and ``net_config`` holds overrides of what was read
    (e.g. ``{"window_size": 8}``)."""
    source = str(dict(files)) if isinstance(files, Mapping) else str(files)
    parts = list(files.items()) if isinstance(files, Mapping) else [("", files)]
    states = [(part, file, *official_weights(file, ema)) for part, file in parts]
    if net_config is None or "_target_" not in net_config:
        if isinstance(files, Mapping):
            part_states = {part: state for part, _, state, _ in states}
            net_config = infer_parts_config(part_states, {part: str(file) for part, file in parts}, net_config)
        else:
            net_config = infer_network_config(states[0][2], source, net_config)
    net = _build(net_config, source)
    for part, file, state, key in states:
        load_weights(net.get_submodule(part) if part else net, state, f"{file} ({key}{', as ' + part if part else ''})")
    return LoadedNetwork(net, _as_dict(net_config), {}, source, ",".join(key for *_, key in states))


def load_network(weights: str | Path | Mapping[str, str], net_config: Mapping | None = None, ema: bool = True) -> LoadedNetwork:
    """The network stored in ``weights`` (see the module docstring for the accepted kinds); the EMA
    weights where the file holds them, unless ``ema=False`` (the released Swintormer test scores the
    raw ``params``)."""
    if isinstance(weights, Mapping):
        return _official_network(weights, net_config, ema)
    path = Path(weights)
    if path.is_dir() or path.suffix == ".safetensors":
        return _exported_network(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".ckpt":
        return _lightning_network(path, ema)
    return _official_network(path, net_config, ema)
