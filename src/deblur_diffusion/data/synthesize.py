"""Writes synthetic blur pairs to disk in the GoPro layout.

``python -m deblur_diffusion.data.synthesize out=DIR [bit_depth=16] [layout=scenes]``
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from deblur_diffusion.cli import config_dir, report_errors, require_complete
from deblur_diffusion.data.io import write_image
from deblur_diffusion.data.synthetic import SyntheticPairs
from deblur_diffusion.errors import ConfigError

LAYOUTS = ("flat", "scenes")


def synthesize(
    out: str | Path,
    train_pairs: int = 16,
    test_pairs: int = 4,
    image_size: int = 128,
    kernel_size: int = 15,
    kernel_kinds: tuple[str, ...] = ("defocus", "motion", "gaussian"),
    noise_sigma_max: float = 0.0,
    bit_depth: int = 8,
    layout: str = "flat",
    pairs_per_scene: int = 4,
    seed: int = 0,
) -> dict[str, int]:
    """Writes ``train_pairs`` random training pairs and ``test_pairs`` validation-stream pairs;
    returns the number written per split."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if bit_depth not in (8, 16):
        raise ConfigError(f"bit_depth must be 8 or 16, got {bit_depth}")
    out = Path(out)
    options = {
        "image_size": image_size,
        "kernel_size": kernel_size,
        "kernel_kinds": tuple(kernel_kinds),
        "noise_sigma_max": noise_sigma_max,
        "seed": seed,
    }
    written = {}
    for split, count, stream in (("train", train_pairs, "train"), ("test", test_pairs, "val")):
        if count <= 0:
            continue
        source = SyntheticPairs(split=stream, length=count, **options)
        for index in track(range(count), description=f"writing {split} pairs", transient=True):
            lq, gt = source.load(index, np.random.default_rng([seed, index]))
            if layout == "flat":
                blur_path = out / split / "input" / f"{index:06d}.png"
                sharp_path = out / split / "target" / f"{index:06d}.png"
            else:
                scene = out / split / f"scene{index // pairs_per_scene:03d}"
                blur_path = scene / "blur" / f"{index % pairs_per_scene:06d}.png"
                sharp_path = scene / "sharp" / f"{index % pairs_per_scene:06d}.png"
            write_image(blur_path, lq, bit_depth)
            write_image(sharp_path, gt, bit_depth)
        written[split] = count
    return written


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="synthesize")
@report_errors
def main(cfg: DictConfig) -> None:
    require_complete(cfg)
    options = {k: v for k, v in cfg.items() if k != "hydra"}
    written = synthesize(**options)
    Console().print(
        f"Wrote {', '.join(f'{n} {split} pairs' for split, n in written.items())} ({cfg.bit_depth}-bit, "
        f"{cfg.layout} GoPro layout) to {Path(cfg.out).resolve()}"
    )


if __name__ == "__main__":
    main()
