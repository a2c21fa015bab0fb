"""Restores images: ``python -m deblur_diffusion.predict ckpt=... input=FILE_OR_DIR output=DIR``.

Every image of ``input`` (a file, or the images directly inside a folder) is restored and written
to ``output`` under its own file name, with its own bit depth (8 or 16), turned upright by its
EXIF orientation and with its ICC colour profile kept (PNG and JPEG). Images larger than
``tile_above_pixels`` are restored on overlapping tiles. An unreadable image is reported at the end
and the others are still restored (exit status 1 if any failed). Nothing is ever written into the
input folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from deblur_diffusion.cli import config_dir, report_errors, require_complete, restorer_from_config
from deblur_diffusion.data.io import is_image_file, list_images, read_photo, write_image
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.restorer import Restorer


def input_files(source: Path) -> list[Path]:
    if source.is_file():
        if not is_image_file(source):
            raise ConfigError(f"input {source} is not an image file (by its extension)")
        return [source]
    if not source.is_dir():
        raise ConfigError(f"input {source} does not exist")
    files = list_images(source)
    if not files:
        raise ConfigError(f"input folder {source} holds no images")
    return files


def check_output(source: Path, output: Path) -> None:
    """Refuses an output folder that is the input folder or inside it."""
    input_dir = (source if source.is_dir() else source.parent).resolve()
    resolved = output.resolve()
    if resolved == input_dir or input_dir in resolved.parents:
        raise ConfigError(f"output {output} is inside the input folder {input_dir}; choose a folder outside it")


def restore_file(restorer: Restorer, tiled: Restorer, path: Path, output: Path, tile_above_pixels: int) -> Path:
    """Restores one photo upright (its EXIF orientation applied) and writes it with its bit depth and
    ICC profile (the file carries no orientation any more)."""
    raw, profile = read_photo(path)
    bit_depth = 16 if raw.dtype.itemsize == 2 else 8
    image = torch.from_numpy(raw.astype("float32") / float(2**bit_depth - 1)).permute(2, 0, 1)
    chosen = tiled if image.shape[1] * image.shape[2] > tile_above_pixels else restorer
    restored = chosen.restore(image)
    return write_image(output / path.name, restored.permute(1, 2, 0).numpy(), bit_depth, profile)


def predict(cfg: DictConfig) -> tuple[list[Path], dict[Path, str]]:
    """Restores ``cfg.input`` into ``cfg.output``; returns the files written and the failures."""
    require_complete(cfg, unused=("data.", "model."))
    source, output = Path(cfg.input), Path(cfg.output)
    files = input_files(source)
    check_output(source, output)
    restorer = restorer_from_config(cfg)
    if restorer.needs_sharp:
        raise ConfigError("this is a stage-one HI-Diff checkpoint, whose prior needs the sharp image; predict with stage two's")
    if restorer.input_channels != 3:
        raise ConfigError(f"the model reads {restorer.input_channels} input channels (dual-pixel or prior); predict restores RGB images")
    tiled_inference = copy.copy(restorer.inference)
    tiled_inference.mode = "tiles"
    tiled_inference.progress = True
    tiled = Restorer(restorer.net, tiled_inference, restorer.device, restorer.weights, restorer.precision)

    console = Console()
    written, failures = [], {}
    for path in track(files, description=f"restoring {len(files)} images", console=console):
        try:
            written.append(restore_file(restorer, tiled, path, output, cfg.tile_above_pixels))
        except DeblurError as error:
            failures[path] = str(error)
    console.print(f"Restored {len(written)} of {len(files)} images into {output}", highlight=False)
    for path, reason in failures.items():
        console.print(f"  failed: {path}: {reason}", style="red", highlight=False, soft_wrap=True)
    return written, failures


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
@report_errors
def main(cfg: DictConfig) -> None:
    _, failures = predict(cfg)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
