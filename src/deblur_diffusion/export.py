"""Exports a network's weights: ``python -m deblur_diffusion.export ckpt=... out=DIR [format=official]``.

``format=safetensors`` (default): ``DIR/model.safetensors`` holds the inference weights (the EMA
when the run kept one) and ``DIR/config.yaml`` the network's config, its inference settings and
where it came from; ``deblur_diffusion.load_pretrained(DIR)`` rebuilds it.
``format=official``: the authors' release files (``DIR/net_g.pth`` holding ``{'params': ...}``, and
for HI-Diff the encoder and denoiser files), for the official test scripts and the tools that read
them.
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


def export(weights, out: str | Path, net_config: Mapping | None = None, inference_config: Mapping | None = None) -> Path:
    """Writes the export folder ``out`` for ``weights`` (see :func:`deblur_diffusion.weights.load_network`)."""
    loaded = load_network(weights, net_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(loaded.net, str(out / EXPORT_WEIGHTS))
    record = {
        "net": loaded.net_config,
        "inference": dict(inference_config or loaded.inference_config),
        "source": loaded.source,
    }
    OmegaConf.save(OmegaConf.create(record), out / EXPORT_CONFIG)
    return out


FORMATS = ("safetensors", "official")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@report_errors
def main(cfg: DictConfig) -> None:
    require_complete(cfg, unused=("data.", "model."))
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    weights, net_config = weights_and_architecture(cfg)
    if cfg.format == "official":
        written = save_official(load_network(weights, net_config).net, cfg.out)
        Console().print(f"Exported {', '.join(str(path) for path in written)} (official release format)", highlight=False)
        return
    inference = OmegaConf.to_container(cfg.inference, resolve=True) if net_config else None
    out = export(weights, cfg.out, net_config, inference)
    Console().print(f"Exported {out / EXPORT_WEIGHTS} and {out / EXPORT_CONFIG}", highlight=False)


if __name__ == "__main__":
    main()
