"""Exports a network's weights: ``python -m deblur_diffusion.export ckpt=... out=DIR [format=official]``.

``format=safetensors`` (default): ``DIR/model.safetensors`` holds one set of weights (``ema=true``,
the default: the EMA when the run kept one, the weights ``evaluate`` scores; ``ema=false``: the raw
weights) and ``DIR/config.yaml`` the network's config, its inference settings, which weights these
are and where they came from; ``deblur_diffusion.load_pretrained(DIR)`` rebuilds it.
``format=official``: the authors' release files (``DIR/net_g.pth``, and for HI-Diff the encoder and
denoiser files) as BasicSR saves them: ``params`` the raw weights and, when there is an EMA,
``params_ema`` the EMA; for the official test scripts and the tools that read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from safetensors.torch import save_model

from deblur_diffusion.cli import config_dir, report_errors, require_complete, weights_and_architecture
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.weights import EXPORT_CONFIG, EXPORT_WEIGHTS, load_network, save_official


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
        "source": loaded.source,
    }
    OmegaConf.save(OmegaConf.create(record), out / EXPORT_CONFIG)
    return out


def export_official(weights, out: str | Path, net_config: Mapping | None = None) -> list[Path]:
    """The official release files of ``weights``: ``params`` raw, ``params_ema`` when it has an EMA."""
    raw = load_network(weights, net_config, ema=False)
    averaged = load_network(weights, net_config, ema=True)
    has_ema = averaged.weights == "ema" or "params_ema" in averaged.weights.split(",")
    return save_official(raw.net, out, averaged.net if has_ema else None)


FORMATS = ("safetensors", "official")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@report_errors
def main(cfg: DictConfig) -> None:
    require_complete(cfg, unused=("data.", "model."))
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    weights, net_config = weights_and_architecture(cfg)
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
