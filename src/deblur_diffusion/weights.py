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
from deblur_diffusion.downloads import file_sha256, local_weights
from deblur_diffusion.models import NETWORK_TARGETS
from deblur_diffusion.models.detect import RELEASED_VIEWS, infer_network_config, infer_parts_config

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


@dataclass
class LoadedNetwork:
    """A network ready for inference, with the config that builds it.

    ``weights`` says which weights were loaded: ``"ema"`` or ``"raw"`` (a checkpoint of this
    package or an export of it), or the key of the official file (``params_ema``, ``params``;
    one per file, comma-separated, for several files). ``views`` is the order a dual-pixel network
    reads its views in (``["l", "r"]``...), as the checkpoint's training data or the export
    recorded it, or as the official release reads them; None where nothing says. ``sha256`` is
    the digest of the weights file (one per part for several files), for the records.
    """

    net: nn.Module
    net_config: dict
    inference_config: dict = field(default_factory=dict)
    source: str = ""
    weights: str = ""
    views: list[str] | None = None
    sha256: str | dict[str, str] = ""


def _as_dict(config) -> dict:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def check_network_config(config, source: str, key: str = "") -> None:
    """Refuses a network config that names anything but this package's networks and their parts
    (``NETWORK_TARGETS``) as a ``_target_``, at any depth, or holds an interpolation (``${...}``,
    which the build would resolve into a config nobody checked): a config stored in a file chooses
    which classes are built, so a downloaded file could otherwise call any function."""
    if isinstance(config, Mapping):
        for name, value in config.items():
            where = f"{key}.{name}" if key else str(name)
            if name == "_target_" and value not in NETWORK_TARGETS:
                raise CheckpointError(
                    f"{source}: refusing to build {value!r} ({where}): a network config may only name "
                    "this package's networks (deblur_diffusion.models) and the diffusers parts of its latent prior"
                )
            check_network_config(value, source, where)
    elif isinstance(config, list | tuple):
        for index, value in enumerate(config):
            check_network_config(value, source, f"{key}[{index}]")
    elif isinstance(config, str) and "${" in config:
        raise CheckpointError(f"{source}: {key} holds an interpolation ({config!r}); a network config holds plain values")


def _build(net_config: Mapping, source: str) -> nn.Module:
    if "_target_" not in net_config:
        raise CheckpointError(f"{source}: the network config has no _target_ (got keys {sorted(net_config)})")
    check_network_config(net_config, source)
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
    return LoadedNetwork(net, net_config, config.get("inference", {}), str(path), kind, _trained_views(config))


def _trained_views(config: dict) -> list[str] | None:
    """The DPDD views a run of this package read (its data config's, training split first)."""
    data = config.get("data") or {}
    for split in ("train", "val", "test"):
        views = (data.get(split) or {}).get("views")
        if views:
            return list(views)
    return None


def _exported_network(path: Path) -> LoadedNetwork:
    folder = path if path.is_dir() else path.parent
    weights, config_file = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    for required in (weights, config_file):
        if not required.is_file():
            raise CheckpointError(f"{folder} is not an export folder: {required.name} is missing")
    # Not resolved: an interpolation in a stored config is refused by the check, never evaluated.
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    if not isinstance(config, dict) or not isinstance(config.get("net"), dict):
        raise CheckpointError(f"{config_file} has no 'net' mapping (the network's config)")
    net = _build(config["net"], str(config_file))
    load_weights(net, load_file(weights), str(weights))
    views = config.get("views")
    return LoadedNetwork(net, config["net"], config.get("inference", {}), str(folder), str(config.get("weights", "")), views)


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
    net_config = _as_dict(net_config)
    views = RELEASED_VIEWS.get(net_config["_target_"].rsplit(".", 1)[-1])
    return LoadedNetwork(net, net_config, {}, source, ",".join(key for *_, key in states), views)


def load_network(
    weights: str | Path | Mapping[str, str], net_config: Mapping | None = None, ema: bool = True, sha256: str | None = None
) -> LoadedNetwork:
    """The network stored in ``weights`` (see the module docstring for the accepted kinds; a file
    may be an ``https://`` URL, downloaded once into a cache, :mod:`deblur_diffusion.downloads`);
    the EMA weights where the file holds them, unless ``ema=False`` (the released Swintormer test
    scores the raw ``params``). ``sha256``, when given, must be the single file's digest."""
    weights = local_weights(dict(weights) if isinstance(weights, Mapping) else weights, sha256)
    loaded = _load_network(weights, net_config, ema)
    loaded.sha256 = _digests(weights)
    return loaded


def _digests(weights) -> str | dict[str, str]:
    if isinstance(weights, dict):
        return {part: file_sha256(file) for part, file in weights.items()}
    return file_sha256(weights)


def _load_network(weights, net_config: Mapping | None, ema: bool) -> LoadedNetwork:
    if isinstance(weights, Mapping):
        return _official_network(weights, net_config, ema)
    path = Path(weights)
    if path.is_dir() or path.suffix == ".safetensors":
        return _with_architecture(_exported_network(path), net_config)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".ckpt":
        return _with_architecture(_lightning_network(path, ema), net_config)
    return _official_network(path, net_config, ema)


def _with_architecture(loaded: LoadedNetwork, net_config: Mapping | None) -> LoadedNetwork:
    """A checkpoint or export builds the network its file records; a given architecture
    (``model=...``) that names another network is a mistake, refused rather than ignored."""
    given = str((net_config or {}).get("_target_", "")).rsplit(".", 1)[-1]
    stored = str(loaded.net_config.get("_target_", "")).rsplit(".", 1)[-1]
    if given and given != stored:
        raise CheckpointError(
            f"the model config names a {given}, but {loaded.source} holds a {stored}: a checkpoint or export "
            "builds the network it records; drop model=... (it is only for official .pth files)"
        )
    return loaded
