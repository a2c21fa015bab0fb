"""Restores images: ``python -m deblur_diffusion.predict ckpt=... input=FILE_OR_DIR output=DIR``.

``ckpt`` is a checkpoint, an export folder or an official file, by path or by ``https://`` URL
(downloaded once into a cache, :mod:`deblur_diffusion.downloads`; ``ckpt_sha256=`` checks it).
Every image of ``input`` (a file, or the images directly inside a folder) is restored and written
to ``output`` under its own file name, with its own bit depth (8 or 16), turned upright by its
EXIF orientation, with its EXIF (orientation reset) and ICC colour profile kept (PNG and JPEG;
JPEGs at ``jpeg_quality``). Images larger than ``max_pixels`` (``auto``: what the GPU's free memory
holds, 4 MP on a CPU) are restored on overlapping tiles, and on tiles halved in size after an
out-of-memory error (kept for the next images). A file that cannot be restored (unreadable, or a
format such as HEIC or camera RAW) is named at the end with the reason and the others are still
restored (exit status 1 if any failed). On a CPU the network runs through ONNX Runtime when it is
installed (``backend=auto``, :mod:`deblur_diffusion.inference.onnx`), 1.6-2.5x faster than PyTorch.
``output/predict.json`` records the weights (SHA-256), the views, the backend and the settings.
Nothing is ever written into the input folder.

Models that read more than the photo:

* dual-pixel models read a folder with ``inputL/`` and ``inputR/`` (DPDD's re-laid layout) or
  ``<split>_l/source/`` and ``<split>_r/source/`` (DPDD as distributed; ``split=`` chooses among
  several), pairs matched by file stem, and write one restored image per pair. ``views=auto`` feeds
  the views in the order the weights were trained with: as a checkpoint's data config or an export
  records it, ``[r, l]`` for the released Swintormer, ``[l, r]`` for the released Restormer;
* a network fed with Swintormer's diffusion prior reads it from ``prior.dir`` (written by
  ``generate_prior input=<the photos> out=DIR``), or samples it with the released LDM-BSR
  (``prior.ckpt=model.ckpt prior.ldm_config=config.yaml``) as ``generate_prior`` does with its
  defaults (the official prior, ``prior.steps`` DDIM steps from ``prior.seed``, stored at 16 bits),
  conditioned on the photo, or for dual-pixel folders on the combined view (as the official script).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import track

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.cli import config_dir, report_errors, require_complete, restorer_and_record
from deblur_diffusion.data.folders import DPDD_VIEWS
from deblur_diffusion.data.io import (
    is_image_file,
    list_images,
    quantized,
    read_image_raw,
    read_photo,
    to_float,
    unsupported_reason,
    write_atomically,
    write_image,
)
from deblur_diffusion.data.priors import prior_path
from deblur_diffusion.downloads import local_weights
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.inference.onnx import BACKEND_NAMES
from deblur_diffusion.models.latent_prior import prior_seed
from deblur_diffusion.provenance import provenance
from deblur_diffusion.restorer import Restorer, whole_image_budget

PRIOR_BIT_DEPTH = 16
RECORD = "predict.json"
# The settings a restoration depends on, recorded in predict.json.
RECORDED_SETTINGS = ("ema", "inference", "precision", "backend", "seed", "prior", "max_pixels", "jpeg_quality", "device")


def input_files(source: Path) -> tuple[list[Path], dict[Path, str]]:
    """The images to restore in ``source`` (a file, or the files directly inside a folder) and the
    photos passed over, in a format this package cannot read, with the reason."""
    if source.is_file():
        reason = unsupported_reason(source)
        if reason is None and not is_image_file(source):
            raise ConfigError(f"input {source} is not an image file (by its extension)")
        return ([], {source: reason}) if reason else ([source], {})
    others = sorted(p for p in source.iterdir() if p.is_file() and not is_image_file(p))
    skipped = {path: reason for path in others if (reason := unsupported_reason(path))}
    images = list_images(source)
    if not images and not skipped:
        raise ConfigError(f"input folder {source} holds no images")
    return images, skipped


def check_output(source: Path, output: Path) -> None:
    """Refuses an output folder that is the input folder or inside it."""
    input_dir = (source if source.is_dir() else source.parent).resolve()
    resolved = output.resolve()
    if resolved == input_dir or input_dir in resolved.parents:
        raise ConfigError(f"output {output} is inside the input folder {input_dir}; choose a folder outside it")


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


def view_folders(source: Path, split: str | None = None) -> dict[str, Path]:
    """The DPDD view folders in ``source``: the re-laid ``inputC/``, ``inputL/``, ``inputR/``, or
    as distributed ``<split>_c/source/``, ``<split>_l/source/``, ``<split>_r/source/``."""
    if not source.is_dir():
        return {}
    relaid = {view: source / f"input{view.upper()}" for view in DPDD_VIEWS if (source / f"input{view.upper()}").is_dir()}
    if relaid:
        return relaid
    distributed = [folder for folder in source.iterdir() if re.fullmatch(r".+_[clr]", folder.name) and (folder / "source").is_dir()]
    splits = sorted({folder.name[:-2] for folder in distributed})
    if split is not None:
        if split not in splits:
            raise ConfigError(f"{source} has no DPDD split {split!r} (it holds {splits or 'none'}: <split>_l/source/...)")
        splits = [split]
    if len(splits) > 1:
        raise ConfigError(f"{source} holds the DPDD splits {splits} side by side: choose one with split=...")
    return {
        view: source / f"{splits[0]}_{view}" / "source"
        for view in DPDD_VIEWS
        if splits and (source / f"{splits[0]}_{view}" / "source").is_dir()
    }


def photos(source: Path, views: list[str], split: str | None = None) -> tuple[list[Photo], dict[Path, str]]:
    """What ``source`` holds for a model reading ``views``: plain images (one view) or DPDD's view
    folders, matched by stem (refusing a mixed or incomplete folder, naming what is missing); and
    the files skipped with the reason."""
    folders = view_folders(source, split)
    if not folders:
        if views != ["c"]:
            raise ConfigError(
                f"the model reads {len(views)} dual-pixel views but {source} is not a folder in DPDD's layout: "
                "give a folder with inputL/ and inputR/ (or DPDD's test_l/source/ and test_r/source/; and the combined "
                "view when a prior is sampled), files matched by name; or, if it reads a photo and its diffusion prior, "
                "give prior.dir=... or prior.ckpt=... prior.ldm_config=..."
            )
        images, skipped = input_files(source)
        return [Photo(path.stem, [path], path) for path in images], skipped
    loose = list_images(source)
    if loose:
        raise ConfigError(f"{source} mixes images ({loose[0].name}, ...) with DPDD view folders {sorted(str(f) for f in folders.values())}")
    needed = [view for view in views if view not in folders]
    if needed:
        raise ConfigError(f"{source} has no folder for the {DPDD_VIEWS[needed[0]]} view the model reads (inputX/ or <split>_x/source/)")
    listed, skipped = {}, {}
    for view, folder in folders.items():
        images, passed_over = input_files(folder)
        listed[view] = {path.stem: path for path in images}
        skipped.update(passed_over)
    names = sorted(set().union(*(listed[view] for view in views)))
    result = []
    for name in names:
        absent = [f"{folders[view]}/{name}.*" for view in views if name not in listed[view]]
        if absent:
            raise ConfigError(f"pair {name!r} has no {absent[0]} (every view folder needs the same file names)")
        condition = listed.get("c", {}).get(name)
        result.append(Photo(name, [listed[view][name] for view in views], condition))
    return result, skipped


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
            # Addresses are downloaded once into the cache, as ckpt= and generate_prior's are.
            self.model = load_compvis_ldm(local_weights(cfg.prior.ckpt), local_weights(cfg.prior.ldm_config), use_ema=True)
            self.model.prior, self.model.sampling_steps = "official", int(cfg.prior.steps)
            self.model.noise_seed = prior_seed(cfg.prior.seed)
            self.model.to(device).eval()

    def __call__(self, photo: Photo, shape: tuple[int, ...]) -> np.ndarray:
        if self.folder is not None:
            path = prior_path(self.folder, photo.name)
            if not path.is_file():
                raise DeblurError(f"no prior for {photo.name}: {path} is missing (generate_prior input=... out={self.folder})")
            prior = to_float(read_image_raw(path))
        else:
            if photo.condition is None:
                raise DeblurError(
                    f"no combined view for {photo.name}: the prior is sampled from the combined view (inputC/ or *_c/source/)"
                )
            condition = torch.from_numpy(to_float(read_photo(photo.condition)[0])).permute(2, 0, 1)[None]
            with torch.no_grad():
                sampled = self.model(condition.to(self.device))[0].permute(1, 2, 0).cpu().numpy()
            # As generate_prior stores it (16 bits), so a network trained on those priors gets its own kind.
            prior = quantized(sampled, PRIOR_BIT_DEPTH)
        if prior.shape != shape:
            raise DeblurError(f"the prior of {photo.name} is {prior.shape[1]}x{prior.shape[0]}, its image {shape[1]}x{shape[0]}")
        return prior.astype(np.float32)


def restore_file(
    restorer: Restorer,
    photo: Photo,
    output: Path,
    max_pixels: int,
    prior: PriorSource | None = None,
    jpeg_quality: int = 95,
) -> Path:
    """Restores one photo (or dual-pixel pair) upright (its EXIF orientation applied) and writes it
    with its bit depth, EXIF (orientation reset) and ICC profile. Photos over ``max_pixels`` go on
    tiles (the restorer's tile settings)."""
    read = [read_photo(path) for path in photo.views]
    raw, metadata = read[0]
    for path, (view, _) in zip(photo.views[1:], read[1:], strict=True):
        if view.shape != raw.shape:
            raise DeblurError(f"view {path} is {view.shape[1]}x{view.shape[0]} but {photo.views[0]} is {raw.shape[1]}x{raw.shape[0]}")
    bit_depth = 16 if raw.dtype.itemsize == 2 else 8
    planes = [to_float(view) for view, _ in read]
    if prior is not None:
        planes.append(prior(photo, planes[0].shape))
    image = torch.from_numpy(np.concatenate(planes, axis=2)).permute(2, 0, 1)
    inference = restorer.inference
    if image.shape[1] * image.shape[2] > max_pixels:
        inference = copy.copy(inference)
        inference.mode, inference.progress = "tiles", True
    restored = restorer.restore(image, inference=inference)
    return write_image(output / photo.output_name, restored.permute(1, 2, 0).numpy(), bit_depth, metadata, jpeg_quality)


def model_views(cfg: DictConfig, restorer: Restorer, with_prior: bool) -> tuple[list[str], str]:
    """The views the model reads and why: ``cfg.views``, ``[c]`` for one image, else the order its
    weights record (:attr:`Restorer.views`), else ``[l, r]``."""
    image_views = restorer.input_channels // IMAGE_CHANNELS - with_prior
    if cfg.views != "auto":
        views, origin = list(cfg.views), "as given"
    elif image_views == 1:
        views, origin = ["c"], "one image"
    elif restorer.views and len(restorer.views) == image_views:
        views, origin = list(restorer.views), "as the weights record"
    else:
        views, origin = ["l", "r"], "nothing records the order: left then right; set views= if it was trained otherwise"
    unknown = [view for view in views if view not in DPDD_VIEWS]
    if unknown:
        raise ConfigError(f"views must be a list of {list(DPDD_VIEWS)}, got {views}")
    expected = IMAGE_CHANNELS * (len(views) + with_prior)
    if expected != restorer.input_channels:
        hint = "" if with_prior else "; a prior-fused network also needs prior.dir=... or prior.ckpt=... prior.ldm_config=..."
        raise ConfigError(
            f"the model reads {restorer.input_channels} input channels, "
            f"but views={views}{' + a prior' if with_prior else ''} give {expected}{hint}"
        )
    return views, origin


def predict(cfg: DictConfig) -> tuple[list[Path], dict[Path, str]]:
    """Restores ``cfg.input`` into ``cfg.output``; returns the files written and the failures."""
    require_complete(cfg, unused=("data.", "model."))
    source, output = Path(cfg.input), Path(cfg.output)
    if not source.exists():
        raise ConfigError(f"input {source} does not exist")
    check_output(source, output)
    restorer, loaded = restorer_and_record(cfg)
    if restorer.needs_sharp:
        raise ConfigError("this is a stage-one HI-Diff checkpoint, whose prior needs the sharp image; predict with stage two's")
    with_prior = cfg.prior.dir is not None or cfg.prior.ckpt is not None
    views, origin = model_views(cfg, restorer, with_prior)
    todo, skipped = photos(source, views, cfg.get("split"))
    failures = dict(skipped)
    prior = PriorSource(cfg, restorer.device) if with_prior else None
    max_pixels = whole_image_budget(restorer, cfg.max_pixels)

    console = Console()
    console.print(f"running on {restorer.device} through {BACKEND_NAMES[restorer.backend]}", highlight=False)
    if views != ["c"]:
        console.print(f"dual-pixel views {views} ({origin})", highlight=False)
    written = []
    for photo in track(todo, description=f"restoring {len(todo)} images", console=console):
        try:
            written.append(restore_file(restorer, photo, output, max_pixels, prior, int(cfg.jpeg_quality)))
        except DeblurError as error:
            failures[photo.views[0]] = str(error)
    record = {
        "ckpt": OmegaConf.to_container(cfg.ckpt) if OmegaConf.is_config(cfg.ckpt) else str(cfg.ckpt),
        "sha256": loaded.sha256,
        "weights": loaded.weights,
        "views": views,
        "backend": restorer.backend,
        "settings": {key: OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key] for key in RECORDED_SETTINGS},
        "fallback_tiles": restorer.fallback.tile_size if restorer.fallback else None,
        "restored": [path.name for path in written],
        "failed": {str(path): reason for path, reason in failures.items()},
        "provenance": provenance(),
    }
    output.mkdir(parents=True, exist_ok=True)
    write_atomically(output / RECORD, json.dumps(record, indent=2))
    console.print(f"Restored {len(written)} of {len(todo) + len(skipped)} images into {output}", highlight=False)
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
