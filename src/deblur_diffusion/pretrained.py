"""Loading a trained model for inference, whatever file it comes in, and restoring images with it.

    from deblur_diffusion import load_pretrained
    restorer = load_pretrained("outputs/.../checkpoints/step0300000.ckpt")   # or an export folder
    sharp = restorer.restore_image(Image.open("blurry.png"))

Three kinds of weights load through :func:`load_network`:

* a Lightning checkpoint of this project (``.ckpt``): the network's config travels inside it; the
  EMA weights are used when the run kept them (``ema=False``: the raw weights);
* an export folder of ``python -m deblur_diffusion.export`` (``model.safetensors`` + ``config.yaml``);
* the official release files (``.pth`` holding ``{'params': ...}``), which carry no config: pass the
  network's config (e.g. the ``net`` node of ``conf/model/restormer.yaml``). Models made of several
  files (HI-Diff: ``net_g``, ``net_le_dm``, ``net_d``) take a mapping from the network's part to its
  file, e.g. ``{transformer: net_g.pth, condition_encoder: net_le_dm.pth, denoiser: net_d.pth}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from deblur_diffusion.checkpoints import CheckpointError, load_weights, official_state_dict, read_checkpoint
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.inference import Inference
from deblur_diffusion.models.hidiff import HIDiffStageOneNet

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
IMAGE_CHANNELS = 3


@dataclass
class LoadedNetwork:
    """A network ready for inference, with the config that builds it."""

    net: nn.Module
    net_config: dict
    inference_config: dict = field(default_factory=dict)
    source: str = ""


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
    state = checkpoint["state_dict"]
    prefix = "ema.module." if ema and any(key.startswith("ema.module.") for key in state) else "net."
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    load_weights(net, weights, f"{path} ({prefix[:-1]})")
    return LoadedNetwork(net, net_config, config.get("inference", {}), str(path))


def _exported_network(path: Path) -> LoadedNetwork:
    folder = path if path.is_dir() else path.parent
    weights, config_file = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    for required in (weights, config_file):
        if not required.is_file():
            raise CheckpointError(f"{folder} is not an export folder: {required.name} is missing")
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    net = _build(config["net"], str(config_file))
    load_weights(net, load_file(weights), str(weights))
    return LoadedNetwork(net, config["net"], config.get("inference", {}), str(folder))


def _official_network(files: str | Path | Mapping[str, str], net_config: Mapping | None, ema: bool) -> LoadedNetwork:
    source = str(dict(files)) if isinstance(files, Mapping) else str(files)
    if net_config is None:
        raise CheckpointError(
            f"{source}: official weights carry no architecture; give the network's config "
            "(on the command line: model=restormer|swintormer|hidiff_s2 and data=... for the channels)"
        )
    net = _build(net_config, source)
    if isinstance(files, Mapping):
        for part, file in files.items():
            module = net.get_submodule(part) if part else net
            load_weights(module, official_state_dict(file, ema), f"{file} (as {part})")
    else:
        load_weights(net, official_state_dict(files, ema), str(files))
    return LoadedNetwork(net, _as_dict(net_config), {}, source)


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


def network_input_channels(net: nn.Module) -> int:
    """How many channels of blurry input (image, views, prior) the network reads."""
    if isinstance(net, HIDiffStageOneNet):
        return net.transformer.inp_channels
    inner = getattr(net, "transformer", net)
    return inner.inp_channels


class Restorer:
    """A loaded network with its inference settings: restores tensors, arrays and PIL images.

    Args:
        net: the network (moved to ``device`` and set to eval mode).
        inference: whole-image or tiled inference, optional x8 self-ensemble.
        device: where to run.
    """

    def __init__(self, net: nn.Module, inference: Inference | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.inference = inference or Inference()
        self.input_channels = network_input_channels(net)
        self.needs_sharp = isinstance(net, HIDiffStageOneNet)

    @torch.no_grad()
    def restore(self, blurry: torch.Tensor, sharp: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) or (C, H, W) in [0, 1] -> the restored RGB in [0, 1], on the input's device.

        ``sharp`` is only for a stage-one HI-Diff network, whose prior comes from the sharp image.
        """
        single = blurry.ndim == 3
        batch = blurry[None] if single else blurry
        if batch.ndim != 4 or batch.shape[1] != self.input_channels:
            raise ValueError(f"the model reads (B, {self.input_channels}, H, W) inputs, got {tuple(blurry.shape)}")
        if self.needs_sharp:
            if sharp is None:
                raise ValueError("a stage-one HI-Diff network computes its prior from the sharp image: pass sharp=, or use stage two")
            batch = torch.cat([batch, sharp[None] if single else sharp], dim=1)
        restored = self.inference(self.net, batch.to(self.device, torch.float32)).clamp(0.0, 1.0).to(blurry.device)
        return restored[0] if single else restored

    def restore_image(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """Restores a PIL image (returned as an 8-bit RGB PIL image) or an H x W x C array (uint8,
        uint16 or float in [0, 1]; returned with the same dtype)."""
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            restored = self.restore(torch.from_numpy(array).permute(2, 0, 1))
            return Image.fromarray(np.round(restored.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        dtype = image.dtype
        scale = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
        restored = self.restore(torch.from_numpy(image.astype(np.float32) / scale).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        return np.round(restored * scale).astype(dtype) if scale != 1.0 else restored.astype(dtype)


def load_pretrained(
    weights: str | Path | Mapping[str, str],
    net_config: Mapping | None = None,
    inference: Inference | None = None,
    device: str | torch.device = "cpu",
) -> Restorer:
    """A :class:`Restorer` for the weights (Lightning checkpoint, export folder or official files).

    Without ``inference``, the settings the model was trained or exported with are used (whole
    images when there are none).
    """
    loaded = load_network(weights, net_config)
    if inference is None:
        settings = {k: v for k, v in loaded.inference_config.items() if k != "_target_"}
        inference = Inference(**settings)
    return Restorer(loaded.net, inference, device)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_and_architecture(cfg: DictConfig) -> tuple[str | dict, dict | None]:
    """``cfg.ckpt`` and, when a model config was given (for official files), its network config."""
    weights = OmegaConf.to_container(cfg.ckpt, resolve=True) if isinstance(cfg.ckpt, DictConfig) else cfg.ckpt
    if not cfg.get("model"):
        return weights, None
    missing = sorted(OmegaConf.missing_keys(cfg.model.net))
    if missing:
        raise ConfigError("missing required config value(s): " + ", ".join(f"model.net.{key}" for key in missing))
    return weights, OmegaConf.to_container(cfg.model.net, resolve=True)


def restorer_from_config(cfg: DictConfig) -> Restorer:
    """The entry points' model: ``cfg.ckpt`` (with ``cfg.model`` for official files), ``cfg.ema``,
    ``cfg.inference``, ``cfg.device`` and, for diffusion models, ``cfg.seed`` as the starting-noise seed."""
    weights, net_config = weights_and_architecture(cfg)
    loaded = load_network(weights, net_config, ema=bool(cfg.get("ema", True)))
    if cfg.get("seed") is not None and hasattr(loaded.net, "noise_seed"):
        loaded.net.noise_seed = int(cfg.seed)
    inference = instantiate(cfg.inference)
    return Restorer(loaded.net, inference, pick_device(cfg.device))
