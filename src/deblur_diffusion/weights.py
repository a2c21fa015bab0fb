"""Reading a trained network from any file it comes in, and writing the official release format.

Three kinds of weights load through :func:`load_network`:

* a Lightning checkpoint of this project (``.ckpt``): the network's config travels inside it; the
  EMA weights are used when the run kept them (``ema=False``: the raw weights);
* an export folder of ``python -m deblur_diffusion.export`` (``model.safetensors`` + ``config.yaml``);
* the official release files (``.pth`` holding ``{'params': ...}``), which carry no config: pass the
  network's config (e.g. the ``net`` node of ``conf/model/restormer.yaml``). Models made of several
  files (HI-Diff: ``net_g``, ``net_le_dm``, ``net_d``) take a mapping from the network's part to its
  file, e.g. ``{transformer: net_g.pth, condition_encoder: net_le_dm.pth, denoiser: net_d.pth}``.

:func:`save_official` writes a network in that release format (the files its ``official_files`` names,
with ``params`` and, for a run with an EMA, ``params_ema``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from deblur_diffusion.checkpoints import (
    CheckpointError,
    lightning_weights,
    load_weights,
    official_state_dict,
    official_weights,
    read_checkpoint,
    stage_weights,
)
from deblur_diffusion.models.interface import RestorationNetwork

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
    source = str(dict(files)) if isinstance(files, Mapping) else str(files)
    if net_config is None:
        raise CheckpointError(
            f"{source}: official weights carry no architecture; give the network's config "
            "(on the command line: model=restormer|swintormer|hidiff_s2 and data=... for the channels)"
        )
    net = _build(net_config, source)
    keys = []
    for part, file in files.items() if isinstance(files, Mapping) else [("", files)]:
        module = net.get_submodule(part) if part else net
        state, key = official_weights(file, ema)
        load_weights(module, state, f"{file} ({key}{', as ' + part if part else ''})")
        keys.append(key)
    return LoadedNetwork(net, _as_dict(net_config), {}, source, ",".join(keys))


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


def save_official(net: RestorationNetwork, out: str | Path, ema_net: RestorationNetwork | None = None) -> list[Path]:
    """Writes ``net`` as the authors release it: one ``.pth`` per part named by ``net.official_files``
    (``net_g.pth``; HI-Diff also ``net_le.pth`` or ``net_le_dm.pth`` and ``net_d.pth``), holding
    ``{'params': raw weights}`` and, given the EMA copy ``ema_net``, ``'params_ema'`` too, as
    BasicSR's ``save_network`` writes a run with an EMA; readable by the official test scripts and
    by :func:`load_network` (which prefers ``params_ema``)."""
    if not net.official_files:
        raise CheckpointError(f"{type(net).__name__} has no official release format (its authors release other files)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for part, stem in net.official_files.items():
        record = {"params": _cpu_state(net, part)}
        if ema_net is not None:
            record["params_ema"] = _cpu_state(ema_net, part)
        path = out / f"{stem}.pth"
        torch.save(record, path)
        written.append(path)
    return written


def _cpu_state(net: nn.Module, part: str) -> dict[str, torch.Tensor]:
    module = net.get_submodule(part) if part else net
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


@dataclass(frozen=True)
class PartWeights:
    """Weights to start one part of a training stage from.

    Attributes:
        part: the submodule of the stage (``net.transformer``, ``latent_encoder``, ``net.prior``...).
        file: a Lightning checkpoint of this package (``.ckpt``: the weights under ``key``, from its
            EMA copy when the run kept one), an official release file (``.pth``), a diffusers LDM
            folder (``key``: its ``vqvae`` or ``unet`` subfolder), or with ``compvis_config`` the
            CompVis ``model.ckpt`` of the released LDM-BSR (its EMA weights and noise schedule).
        key: see ``file``.
        compvis_config: the CompVis ``config.yaml`` that goes with ``file``.
    """

    part: str
    file: str
    key: str = ""
    compvis_config: str | None = None


def warm_start(stage: nn.Module, sources: Sequence[PartWeights]) -> None:
    """Loads each source into its part of ``stage``; every mismatch is named with the file."""
    for source in sources:
        module = stage.get_submodule(source.part)
        label = f"{source.file} ({source.key or 'as ' + source.part})"
        if source.compvis_config is not None:
            from deblur_diffusion.models.compvis_ldm import load_compvis_ldm

            released = load_compvis_ldm(source.file, source.compvis_config, use_ema=True)
            load_weights(module, released.state_dict(), label)
            # Not copied: the buffer is not saved, so a resumed run gets the configured one.
            if not torch.equal(module.alphas_cumprod.cpu(), released.alphas_cumprod):
                raise CheckpointError(f"{label}: the configured noise schedule is not the released one ({source.compvis_config})")
        elif Path(source.file).is_dir() or not Path(source.file).suffix:  # a (diffusers) folder
            load_weights(module, _diffusers_weights(Path(source.file), source.key), label)
        elif Path(source.file).suffix == ".ckpt":
            load_weights(module, lightning_weights(source.file, source.key), label)
        else:
            load_weights(module, official_state_dict(source.file), label)


def _diffusers_weights(folder: Path, subfolder: str) -> dict[str, torch.Tensor]:
    """The weights of a diffusers LDM folder's ``vqvae`` or ``unet`` (as the LDM super-resolution
    release ``CompVis/ldm-super-resolution-4x-openimages``)."""
    from diffusers import UNet2DModel, VQModel

    if not (folder / subfolder / "config.json").is_file():
        raise CheckpointError(
            f"no diffusers-format LDM weights in {folder}: expected {folder}/{{vqvae,unet}}/{{config.json, "
            "diffusion_pytorch_model.safetensors}}. Download CompVis/ldm-super-resolution-4x-openimages (git clone of its "
            "Hugging Face repository) on a machine with internet and copy the folder here. An original CompVis model.ckpt "
            "+ config.yaml loads directly with deblur_diffusion.models.load_compvis_ldm (generate_prior ldm_config=...)."
        )
    model_class = {"vqvae": VQModel, "unet": UNet2DModel}[subfolder]
    return model_class.from_pretrained(folder, subfolder=subfolder).state_dict()
