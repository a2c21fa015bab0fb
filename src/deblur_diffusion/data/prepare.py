"""Prepares the official training crops of a dataset into an LMDB store.

``python -m deblur_diffusion.data.prepare data=dpdd_dual out=DIR``, then train with
``data.prepared_dir=DIR``. See :mod:`deblur_diffusion.data.crops` for the crop rule and :mod:`deblur_diffusion.data.store` for the store.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from deblur_diffusion.cli import config_dir, report_errors, require_complete, split_datamodule
from deblur_diffusion.data.store_writer import prepare_store


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare")
@report_errors
def main(cfg: DictConfig) -> None:
    require_complete(cfg)
    # The store is made from the whole images, whatever prepared_dir the data config points to.
    datamodule = split_datamodule(cfg, cfg.split, prepared_dir=None)
    source = datamodule.pairs(cfg.split)
    console = Console()
    console.print(f"Preparing {source.describe()} with {datamodule.crop_rule} ({cfg.encoding}) into {Path(cfg.out).resolve()}")
    manifest = prepare_store(
        source,
        cfg.out,
        datamodule.crop_rule,
        cfg.encoding,
        overwrite=cfg.overwrite,
        progress=lambda pairs, total: track(pairs, total=total, description="cutting crops", console=console),
    )
    console.print(f"{len(manifest['crops'])} crops of {manifest['settings']['pairs']} pairs in {Path(cfg.out).resolve()}")
    console.print(f"Train from them with data.prepared_dir={Path(cfg.out).resolve()}")


if __name__ == "__main__":
    main()
