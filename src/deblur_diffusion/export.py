"""Exports a network's weights: ``python -m deblur_diffusion.export ckpt=... out=DIR [format=official]``.

``format=safetensors`` (default): ``DIR/model.safetensors`` holds one set of weights (``ema=true``,
the default: the EMA when the run kept one, the weights ``evaluate`` scores; ``ema=false``: the raw
weights) and ``DIR/config.yaml`` the network's config, its inference settings, which weights these
are and where they came from; ``deblur_diffusion.load_pretrained(DIR)`` rebuilds it.
``format=official``: the authors' release files (``DIR/net_g.pth``, and for HI-Diff the encoder and
denoiser files) as BasicSR saves them: ``params`` the raw weights and, when there is an EMA,
``params_ema`` the EMA; for the official test scripts and the tools that read them.
``format=onnx``: ``DIR/model.onnx``, one graph for one image of any height and width from 2 px (the
padding to the network's size multiple and the crop back are inside it), for Restormer and Swintormer (single
image, dual-pixel, or with a precomputed prior as extra input channels); checked against PyTorch
with onnxruntime at a size that is not a multiple of the padding. Diffusion models are refused:
their inference samples seeded noise in a loop of T network calls (HI-Diff stage two, the LDM prior).
Needs the ``export`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from safetensors.torch import save_model
from torch import nn

from deblur_diffusion.checkpoints import CheckpointError
from deblur_diffusion.cli import config_dir, report_errors, require_complete, weights_and_architecture
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.inference.onnx import export_graph, import_onnxruntime
from deblur_diffusion.models.interface import RestorationNetwork
from deblur_diffusion.provenance import provenance
from deblur_diffusion.weights import EXPORT_CONFIG, EXPORT_WEIGHTS, load_network


def export(weights, out: str | Path, net_config: Mapping | None = None, inference_config: Mapping | None = None, ema: bool = True) -> Path:
    """Writes the export folder ``out`` for ``weights`` (see :func:`deblur_diffusion.weights.load_network`):
    the EMA weights where there are some unless ``ema=False``."""
    loaded = load_network(weights, net_config, ema=ema)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(loaded.net, str(out / EXPORT_WEIGHTS))
    record = {
        "net": loaded.net_config,
        "inference": dict(inference_config or loaded.inference_config),
        "weights": loaded.weights,
        "views": loaded.views,
        "source": loaded.source,
        "source_sha256": loaded.sha256,
        "provenance": provenance(),
    }
    OmegaConf.save(OmegaConf.create(record), out / EXPORT_CONFIG)
    return out


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


def export_official(weights, out: str | Path, net_config: Mapping | None = None) -> list[Path]:
    """The official release files of ``weights``: ``params`` raw, ``params_ema`` when it has an EMA."""
    raw = load_network(weights, net_config, ema=False)
    averaged = load_network(weights, net_config, ema=True)
    has_ema = averaged.weights == "ema" or "params_ema" in averaged.weights.split(",")
    return save_official(raw.net, out, averaged.net if has_ema else None)


ONNX_FILE = "model.onnx"


def export_onnx(weights, out: str | Path, net_config: Mapping | None = None, ema: bool = True) -> tuple[Path, float]:
    """Writes ``out/model.onnx`` for ``weights``; returns the file and the largest difference
    between onnxruntime and PyTorch at a second size."""
    import_onnxruntime()  # before loading the weights: a missing extra fails at once
    path = Path(out) / ONNX_FILE
    return path, export_graph(load_network(weights, net_config, ema=ema).net, path)


FORMATS = ("safetensors", "official", "onnx")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@report_errors
def main(cfg: DictConfig) -> None:
    require_complete(cfg, unused=("data.", "model."))
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    weights, net_config = weights_and_architecture(cfg)
    if cfg.format == "onnx":
        path, difference = export_onnx(weights, cfg.out, net_config, ema=bool(cfg.ema))
        Console().print(f"Exported {path} (any height and width; onnxruntime within {difference:.1e} of PyTorch)", highlight=False)
        return
    if cfg.format == "official":
        written = export_official(weights, cfg.out, net_config)
        Console().print(f"Exported {', '.join(str(path) for path in written)} (official release format)", highlight=False)
        return
    inference = OmegaConf.to_container(cfg.inference, resolve=True) if net_config else None
    out = export(weights, cfg.out, net_config, inference, ema=bool(cfg.ema))
    kind = OmegaConf.load(out / EXPORT_CONFIG).weights
    Console().print(f"Exported {out / EXPORT_WEIGHTS} ({kind} weights) and {out / EXPORT_CONFIG}", highlight=False)


if __name__ == "__main__":
    main()
