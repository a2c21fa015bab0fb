"""Restores images: ``python -m deblur_diffusion.predict ckpt=... input=FILE_OR_DIR output=DIR``.

Every image of ``input`` (a file, or the images directly inside a folder) is restored and written
to ``output`` under its own file name, with its own bit depth (8 or 16), turned upright by its
EXIF orientation and with its ICC colour profile kept (PNG and JPEG). Images larger than
``max_pixels`` (``auto``: what the GPU's free memory holds, 4 MP on a CPU) are restored on
overlapping tiles, and on tiles halved in size after an out-of-memory error. An unreadable image is reported at the end
and the others are still restored (exit status 1 if any failed). Nothing is ever written into the
input folder.

Models that read more than the photo:

* dual-pixel models read a folder in DPDD's re-laid layout, ``inputL/`` and ``inputR/`` (``views``:
  their order, default ``[l, r]``; Swintormer's release reads ``[r, l]``), pairs matched by file
  stem, and write one restored image per pair;
* a network fed with Swintormer's diffusion prior reads it from ``prior.dir`` (written by
  ``generate_prior input=<the photos> out=DIR``), or samples it with the released LDM-BSR
  (``prior.ckpt=model.ckpt prior.ldm_config=config.yaml``) as ``generate_prior`` does (the official
  prior, ``prior.steps`` DDIM steps from ``seed``, stored at 16 bits), conditioned on the photo, or
  for dual-pixel folders on ``inputC/`` (the combined view, as the official script).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.cli import config_dir, report_errors, require_complete, restorer_from_config
from deblur_diffusion.data.folders import DPDD_VIEWS
from deblur_diffusion.data.io import is_image_file, list_images, quantized, read_image_raw, read_photo, to_float, write_image
from deblur_diffusion.data.priors import prior_path
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.restorer import Restorer, whole_image_budget


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


PRIOR_BIT_DEPTH = 16


@dataclass
class Photo:
    """One thing to restore: the files of its input views (one for a photo) and, for a prior
    sampled here, the image it is conditioned on."""

    name: str
    views: list[Path]
    condition: Path

    @property
    def output_name(self) -> str:
        return self.views[0].name


def view_folders(source: Path) -> dict[str, Path]:
    """DPDD's re-laid view folders (``inputC``, ``inputL``, ``inputR``) present in ``source``."""
    return {view: source / f"input{view.upper()}" for view in DPDD_VIEWS if (source / f"input{view.upper()}").is_dir()}


def photos(source: Path, views: list[str]) -> list[Photo]:
    """What ``source`` holds for a model reading ``views``: plain images (one view) or DPDD's
    re-laid layout, matched by stem; refuses a mixed or incomplete folder, naming what is missing."""
    folders = view_folders(source) if source.is_dir() else {}
    if not folders:
        if views != ["c"]:
            raise ConfigError(
                f"the model reads {len(views)} dual-pixel views but {source} is not a folder in DPDD's layout: "
                "give a folder with inputL/ and inputR/ (and inputC/ when a prior is sampled), files matched by name; "
                "or, if it reads a photo and its diffusion prior, give prior.dir=... or prior.ckpt=... prior.ldm_config=..."
            )
        return [Photo(path.stem, [path], path) for path in input_files(source)]
    loose = list_images(source)
    if loose:
        raise ConfigError(f"{source} mixes images ({loose[0].name}, ...) with DPDD view folders {sorted(f.name for f in folders.values())}")
    needed = [view for view in views if view not in folders]
    if needed:
        raise ConfigError(f"{source} has no input{needed[0].upper()}/ folder for the {DPDD_VIEWS[needed[0]]} view the model reads")
    listed = {view: {path.stem: path for path in list_images(folder)} for view, folder in folders.items()}
    names = sorted(set().union(*(listed[view] for view in views)))
    result = []
    for name in names:
        absent = [f"{folders[view]}/{name}.*" for view in views if name not in listed[view]]
        if absent:
            raise ConfigError(f"pair {name!r} has no {absent[0]} (every view folder needs the same file names)")
        condition = listed.get("c", {}).get(name)
        result.append(Photo(name, [listed[view][name] for view in views], condition))
    return result


class PriorSource:
    """The diffusion prior of a photo: read from ``prior.dir`` or sampled with the released LDM-BSR."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.folder = Path(cfg.prior.dir) if cfg.prior.dir is not None else None
        self.device = device
        self.model = None
        if self.folder is None:
            from deblur_diffusion.models.compvis_ldm import load_compvis_ldm

            if cfg.prior.ldm_config is None:
                raise ConfigError("prior.ckpt (the released LDM-BSR model.ckpt) needs prior.ldm_config (its config.yaml)")
            self.model = load_compvis_ldm(cfg.prior.ckpt, cfg.prior.ldm_config, use_ema=True)
            self.model.prior, self.model.sampling_steps, self.model.noise_seed = "official", int(cfg.prior.steps), int(cfg.seed)
            self.model.to(device).eval()

    def __call__(self, photo: Photo, shape: tuple[int, ...]) -> np.ndarray:
        if self.folder is not None:
            path = prior_path(self.folder, photo.name)
            if not path.is_file():
                raise DeblurError(f"no prior for {photo.name}: {path} is missing (generate_prior input=... out={self.folder})")
            prior = to_float(read_image_raw(path))
        else:
            if photo.condition is None:
                raise DeblurError(f"no combined view for {photo.name}: the prior is sampled from inputC/{photo.name}.*")
            condition = torch.from_numpy(to_float(read_photo(photo.condition)[0])).permute(2, 0, 1)[None]
            with torch.no_grad():
                sampled = self.model(condition.to(self.device))[0].permute(1, 2, 0).cpu().numpy()
            # As generate_prior stores it (16 bits), so a network trained on those priors gets its own kind.
            prior = quantized(sampled, 16)
        if prior.shape != shape:
            raise DeblurError(f"the prior of {photo.name} is {prior.shape[1]}x{prior.shape[0]}, its image {shape[1]}x{shape[0]}")
        return prior.astype(np.float32)


def restore_file(
    restorer: Restorer, tiled: Restorer, photo: Photo, output: Path, max_pixels: int, prior: PriorSource | None = None
) -> Path:
    """Restores one photo (or dual-pixel pair) upright (its EXIF orientation applied) and writes it
    with its bit depth and ICC profile (the file carries no orientation any more)."""
    read = [read_photo(path) for path in photo.views]
    raw, profile = read[0]
    for path, (view, _) in zip(photo.views[1:], read[1:], strict=True):
        if view.shape != raw.shape:
            raise DeblurError(f"view {path} is {view.shape[1]}x{view.shape[0]} but {photo.views[0]} is {raw.shape[1]}x{raw.shape[0]}")
    bit_depth = 16 if raw.dtype.itemsize == 2 else 8
    planes = [to_float(view) for view, _ in read]
    if prior is not None:
        planes.append(prior(photo, planes[0].shape))
    image = torch.from_numpy(np.concatenate(planes, axis=2)).permute(2, 0, 1)
    chosen = tiled if image.shape[1] * image.shape[2] > max_pixels else restorer
    restored = chosen.restore(image)
    return write_image(output / photo.output_name, restored.permute(1, 2, 0).numpy(), bit_depth, profile)


def model_views(cfg: DictConfig, input_channels: int, with_prior: bool) -> list[str]:
    """The views the model reads: ``cfg.views``, or ``[c]`` / ``[l, r]`` by its channels."""
    views = (
        list(cfg.views)
        if cfg.views != "auto"
        else (["c"] if input_channels - IMAGE_CHANNELS * with_prior == IMAGE_CHANNELS else ["l", "r"])
    )
    unknown = [view for view in views if view not in DPDD_VIEWS]
    if unknown:
        raise ConfigError(f"views must be a list of {list(DPDD_VIEWS)}, got {views}")
    expected = IMAGE_CHANNELS * (len(views) + with_prior)
    if expected != input_channels:
        hint = "" if with_prior else "; a prior-fused network also needs prior.dir=... or prior.ckpt=... prior.ldm_config=..."
        raise ConfigError(
            f"the model reads {input_channels} input channels, but views={views}{' + a prior' if with_prior else ''} give {expected}{hint}"
        )
    return views


def predict(cfg: DictConfig) -> tuple[list[Path], dict[Path, str]]:
    """Restores ``cfg.input`` into ``cfg.output``; returns the files written and the failures."""
    require_complete(cfg, unused=("data.", "model."))
    source, output = Path(cfg.input), Path(cfg.output)
    check_output(source, output)
    restorer = restorer_from_config(cfg)
    if restorer.needs_sharp:
        raise ConfigError("this is a stage-one HI-Diff checkpoint, whose prior needs the sharp image; predict with stage two's")
    with_prior = cfg.prior.dir is not None or cfg.prior.ckpt is not None
    views = model_views(cfg, restorer.input_channels, with_prior)
    todo = photos(source, views)
    prior = PriorSource(cfg, restorer.device) if with_prior else None
    tiled_inference = copy.copy(restorer.inference)
    tiled_inference.mode = "tiles"
    tiled_inference.progress = True
    tiled = Restorer(restorer.net, tiled_inference, restorer.device, restorer.weights, restorer.precision)
    max_pixels = whole_image_budget(restorer, cfg.max_pixels)

    console = Console()
    written, failures = [], {}
    for photo in track(todo, description=f"restoring {len(todo)} images", console=console):
        try:
            written.append(restore_file(restorer, tiled, photo, output, max_pixels, prior))
        except DeblurError as error:
            failures[photo.views[0]] = str(error)
    console.print(f"Restored {len(written)} of {len(todo)} images into {output}", highlight=False)
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
