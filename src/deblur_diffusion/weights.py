"""Reading a trained network from any file it comes in, and writing the official release format.

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
    mismatches,
    official_state_dict,
    official_weights,
    read_checkpoint,
    stage_weights,
)
from deblur_diffusion.models.detect import infer_network_config, infer_parts_config
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
            EMA copy when the run kept one), an official release file (``.pth``: ``params_ema`` when
            it has one, else ``params``), an export folder of this package, a diffusers LDM folder
            (``key``: its ``vqvae`` or ``unet`` subfolder), or with ``compvis_config`` the CompVis
            ``model.ckpt`` of the released LDM-BSR (its EMA weights and noise schedule).
        key: see ``file``.
        compvis_config: the CompVis ``config.yaml`` that goes with ``file``.
        fine_tune: released or trained weights to fine-tune from (``model.init_ckpt``): mismatches
            are reported (:func:`load_for_fine_tuning`) and, unless ``strict``, the parts that do not
            fit keep the network's initialisation.
        strict: with ``fine_tune``, fail on missing, unexpected or mis-shaped keys.
    """

    part: str
    file: str
    key: str = ""
    compvis_config: str | None = None
    fine_tune: bool = False
    strict: bool = True


def fine_tuning_weights(init_ckpt: str | Mapping[str, str], part: str, strict: bool) -> list[PartWeights]:
    """Where ``model.init_ckpt`` starts the stage's ``part`` from: a file or folder for the whole
    part (a ``.ckpt`` of this package gives its ``net``), or official files by sub-part
    (``{transformer: net_g.pth, latent_encoder: net_le.pth}``)."""
    if isinstance(init_ckpt, Mapping):
        return [PartWeights(f"{part}.{sub}" if sub else part, str(file), fine_tune=True, strict=strict) for sub, file in init_ckpt.items()]
    key = "net" if Path(init_ckpt).suffix == ".ckpt" else ""
    return [PartWeights(part, str(init_ckpt), key, fine_tune=True, strict=strict)]


def _widens_input(file_value: torch.Tensor, model_value: torch.Tensor) -> bool:
    """A convolution whose file weights read fewer input channels than the model's, and nothing else differs."""
    return (
        file_value.ndim == model_value.ndim == 4
        and file_value.shape[1] < model_value.shape[1]
        and file_value.shape[:1] + file_value.shape[2:] == model_value.shape[:1] + model_value.shape[2:]
    )


def load_for_fine_tuning(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool) -> list[str]:
    """Loads released or trained weights to fine-tune ``module`` from; returns what to tell the user.

    A convolution of the file that reads fewer input channels (a single-image model started as
    dual-pixel, Swintormer's prior added) keeps the file's filters for the channels they share, and
    its filters for the new channels start at zero, so that the network starts as the file's. Missing,
    unexpected and mis-shaped keys fail, unless ``strict=False``: then they are reported and keep the
    network's initialisation.
    """
    expected = module.state_dict()
    shared = [key for key in expected if key in state]
    widened = [key for key in shared if state[key].shape != expected[key].shape and _widens_input(state[key], expected[key])]
    problems = mismatches(expected, state, widened)
    if problems and strict:
        raise CheckpointError(
            f"model.init_ckpt={source} does not fit {type(module).__name__}: "
            + "; ".join(problems)
            + ". Set model.init_strict=false to start those parameters from the network's initialisation."
        )
    loaded = dict(expected)
    for key in shared:
        if key in widened:
            value = torch.zeros_like(expected[key])
            value[:, : state[key].shape[1]] = state[key]
            loaded[key] = value
        elif state[key].shape == expected[key].shape:
            loaded[key] = state[key]
    module.load_state_dict(loaded)
    notes = [
        f"{key}: the file's filters for input channels 0-{state[key].shape[1] - 1} kept, channels "
        f"{state[key].shape[1]}-{expected[key].shape[1] - 1} start at zero"
        for key in widened
    ]
    if problems:
        notes.append("not loaded, left as initialised: " + "; ".join(problems))
    return notes


def _source_state(source: PartWeights) -> dict[str, torch.Tensor]:
    """The weights of a file or folder that is not a CompVis checkpoint."""
    path = Path(source.file)
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return load_file(path / EXPORT_WEIGHTS)
    if path.is_dir() or not path.suffix:  # a (diffusers) folder
        return _diffusers_weights(path, source.key)
    if path.suffix == ".ckpt":
        return lightning_weights(source.file, source.key)
    if path.suffix == ".safetensors":
        return load_file(path)
    return official_state_dict(source.file)


def warm_start(stage: nn.Module, sources: Sequence[PartWeights]) -> list[str]:
    """Loads each source into its part of ``stage``; every mismatch is named with the file.
    Returns notes for the user: what was loaded where, and what fine-tuning widened or left out."""
    notes = []
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
        elif source.fine_tune:
            notes += [f"{label}: {note}" for note in load_for_fine_tuning(module, _source_state(source), source.file, source.strict)]
        else:
            load_weights(module, _source_state(source), label)
        notes.append(f"{label}: loaded into {source.part or 'the network'}")
    return notes


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
