"""Precomputes Swintormer's diffusion priors:
``python -m deblur_diffusion.generate_prior ckpt=model.ckpt ldm_config=config.yaml data=... split=train out=DIR``.

For every blurry image of a data split (or of a folder), samples the prior with T DDIM steps from a
fixed seed at the image's size and writes it as a 16-bit PNG named after the pair, with a
``manifest.json`` recording every setting a prior depends on (:func:`prior_settings`: the model's
files by content digest, the prior, T, the seed, eta, the tiles and self-ensemble) and the priors written with
them. Consecutive images of one size are sampled ``batch_size`` at a time; every image of a batch
gets the noise it would get alone, so the batch size changes the priors only by float32 rounding
(about 1e-4) and is not recorded.

An interrupted run resumes where it stopped: the priors its manifest lists are kept, any other
image of the folder is written again (each image file appears whole or not at all). A folder with
prior images but no manifest, or a manifest of other settings, is refused: nothing vouches for them.

Dual-pixel data is refused: the official ``generate_feature.py`` conditions on DPDD's combined view
(``train/C``), which ``data=dpdd`` reads under the same pair names as ``data=dpdd_dual``.

``prior=official`` (default) is the released ``generate_feature.py``: the pretrained CompVis
LDM-BSR (``ckpt`` = its ``model.ckpt``, ``ldm_config`` = its ``config.yaml``, EMA weights), the
blurry image at full resolution as condition, the raw sampled latent as prior, LDM's split-input
tiles for large images. ``prior=paper_decoder`` is the paper text's decoded prior, from a
``model=ldm_decoder_finetune`` checkpoint, on overlapping tiles above ``tile_above_pixels``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.cli import config_dir, report_errors, require_complete, split_datamodule
from deblur_diffusion.data.io import list_images, read_photo, to_float, write_atomically, write_image
from deblur_diffusion.data.patches import WholeImages, to_tensor
from deblur_diffusion.data.priors import PRIOR_MANIFEST, PRIOR_SETTINGS, prior_path, require_fixed_pairs
from deblur_diffusion.downloads import file_sha256, local_weights
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.models.compvis_ldm import load_compvis_ldm
from deblur_diffusion.models.latent_prior import PRIORS, LatentPriorModel, prior_seed
from deblur_diffusion.restorer import pick_device
from deblur_diffusion.weights import load_network

PRIOR_BIT_DEPTH = 16


class _Blurry(Dataset):
    """(index, blurry image) for the given indices, read in data workers."""

    def __init__(self, load: Callable[[int], torch.Tensor], indices: list[int]):
        self.load = load
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        return self.indices[position], self.load(self.indices[position])


def same_size_batches(
    images: Iterable[tuple[int, torch.Tensor]], batch_size: int, max_pixels: int | None = None
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, stacked images) of at most ``batch_size`` consecutive images of one size, and of
    at most ``max_pixels`` pixels in all unless a single image is larger."""
    indices, batch = [], []
    for index, image in images:
        full = len(batch) == batch_size or (max_pixels is not None and (len(batch) + 1) * image[0].numel() > max_pixels)
        if batch and (full or image.shape != batch[0].shape):
            yield indices, torch.stack(batch)
            indices, batch = [], []
        indices.append(index)
        batch.append(image)
    if batch:
        yield indices, torch.stack(batch)


def write_manifest(path: Path, manifest: dict) -> None:
    """Replaces the manifest at once, so that an interrupted run never leaves half a file."""
    write_atomically(path, json.dumps(manifest, indent=2))


def prior_settings(cfg: DictConfig, model: LatentPriorModel, ckpt: Path, ldm_config: Path | None) -> dict:
    """Everything a prior depends on, as the manifest records it (the keys of ``PRIOR_SETTINGS``):
    the model's files by content (so that a renamed file is the same model and a replaced one is
    not), the prior, T, the seed, eta, and the tiles and self-ensemble it is sampled with."""
    if model.prior == "official":  # LDM's split-input tiles
        inference = {"split_input": dict(model.split_input), "condition_multiple": model.condition_multiple}
    else:
        inference = {
            "tile_above_pixels": int(cfg.tile_above_pixels),
            **{key: cfg.inference[key] for key in ("tile_size", "stride", "blend")},
        }
    inference["self_ensemble"] = bool(cfg.inference.self_ensemble)
    settings = {
        "ckpt_sha256": file_sha256(ckpt),
        "ldm_config_sha256": file_sha256(ldm_config) if ldm_config is not None else None,
        "prior": model.prior,
        "steps": int(cfg.steps),
        "seed": prior_seed(cfg.seed),
        "eta": model.eta,
        "inference": inference,
    }
    return json.loads(json.dumps(settings))  # as read back from the manifest (tuples become lists)


def vouched_priors(folder: Path, manifest_file: Path, settings: dict, names: list[str]) -> dict[str, str]:
    """The priors of ``names`` already in ``folder`` that its manifest says were written with
    ``settings``; refuses a folder whose prior images nothing vouches for."""
    on_disk = [name for name in names if prior_path(folder, name).is_file()]
    if not manifest_file.is_file():
        if on_disk:
            raise ConfigError(
                f"{folder} holds {len(on_disk)} prior images (e.g. {prior_path(folder, on_disk[0]).name}) but no {PRIOR_MANIFEST}: "
                "nothing says which settings made them. Delete them or choose another out="
            )
        return {}
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{manifest_file} is not valid JSON ({err}); delete it and the priors beside it") from err
    previous = {key: manifest.get(key) for key in PRIOR_SETTINGS}
    if previous != settings:
        differing = [f"{key}: {previous[key]!r} -> {settings[key]!r}" for key in PRIOR_SETTINGS if previous[key] != settings[key]]
        raise ConfigError(
            f"{manifest_file} was written with other settings ({'; '.join(differing)}); use another out= or delete the folder"
        )
    listed = manifest.get("priors", {})
    return {name: listed[name] for name in on_disk if name in listed}


def blurry_images(cfg: DictConfig) -> tuple[list[str], Callable[[int], torch.Tensor], Path]:
    """The names of the images to process, a loader of the blurry image by index, and the folder
    the priors go to."""
    if cfg.input is not None:
        files = list_images(Path(cfg.input)) if Path(cfg.input).is_dir() else []
        if not files:
            raise ConfigError(f"input {cfg.input} is not a folder of images")
        # Read as predict reads a photo (upright by its EXIF orientation), so the prior lines up with it.
        return [f.stem for f in files], lambda index: to_tensor(to_float(read_photo(files[index])[0])), Path(cfg.out)
    if cfg.data.get("dual_pixel"):
        raise ConfigError(
            "generate_prior conditions on DPDD's combined view, as the official generate_feature.py (train/C) does, "
            "not on the dual-pixel views: run it with data=dpdd (the same pair names), then train with "
            "data=dpdd_dual data.prior_dir=<out>"
        )
    # The pairs as training and evaluation read them (views, bit depth), without the priors being
    # written; all training pairs, those a val_fraction holds out included (their priors are read
    # from prior_dir/train).
    source = split_datamodule(cfg, cfg.split, prior_dir=None, val_fraction=None).pairs(cfg.split)
    require_fixed_pairs(source)
    pairs = WholeImages(source)
    names = [source.name(index) for index in range(len(source))]
    # The same blurry image validation reads (WholeImages seeds generated pairs by index).
    return names, lambda index: pairs[index]["lq"][:IMAGE_CHANNELS], Path(cfg.out) / cfg.split


def generate_priors(cfg: DictConfig) -> tuple[int, int]:
    """Writes the missing priors; returns (written, skipped)."""
    require_complete(cfg, unused=("model.", *(f"data.{s}." for s in ("train", "val", "test") if cfg.input is not None or s != cfg.split)))
    # URLs (the released LDM-BSR's) are downloaded once into the cache, as predict's ckpt= is.
    ckpt = Path(local_weights(cfg.ckpt, cfg.ckpt_sha256))
    ldm_config = Path(local_weights(cfg.ldm_config)) if cfg.ldm_config is not None else None
    model = load_compvis_ldm(ckpt, ldm_config, use_ema=True) if ldm_config is not None else load_network(ckpt).net
    if not isinstance(model, LatentPriorModel):
        raise ConfigError(f"{cfg.ckpt} holds a {type(model).__name__}, not a latent diffusion prior (model=ldm_decoder_finetune)")
    if cfg.prior not in (*PRIORS, "auto"):
        raise ConfigError(f"prior must be auto or one of {PRIORS}, got {cfg.prior!r}")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")
    # auto: the prior the model was made for, as its file records it: the raw latent of the
    # released LDM-BSR, the decoded image of this package's ldm_decoder_finetune checkpoints.
    if cfg.prior != "auto":
        model.prior = cfg.prior
    model.sampling_steps, model.noise_seed = int(cfg.steps), prior_seed(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device).eval()
    whole = instantiate(cfg.inference, mode="whole")
    tiled = instantiate(cfg.inference, mode="tiles")

    names, load_blurry, folder = blurry_images(cfg)
    manifest_file = folder / PRIOR_MANIFEST
    settings = prior_settings(cfg, model, ckpt, ldm_config)
    done = vouched_priors(folder, manifest_file, settings, names)
    todo = [index for index, name in enumerate(names) if name not in done]
    # Written before the first prior, so that the images of an interrupted first batch are known
    # to come from these settings (and are written again on resume, as they are not listed).
    manifest = {**settings, "ckpt": str(cfg.ckpt), "ldm_config": cfg.ldm_config, "priors": done}
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest_file, manifest)
    console = Console()
    # Workers read and decode the next images while the device samples the current batch.
    upcoming = DataLoader(_Blurry(load_blurry, todo), batch_size=None, num_workers=min(int(cfg.data.num_workers), len(todo)))
    with Progress(console=console) as progress:
        task = progress.add_task(f"priors of {len(todo)} images (T = {cfg.steps})", total=len(todo))
        # The decoded prior runs whole images up to tile_above_pixels: a batch stays within that bound.
        max_pixels = int(cfg.tile_above_pixels) if model.prior == "paper_decoder" else None
        for indices, blurry in same_size_batches(upcoming, int(cfg.batch_size), max_pixels):
            blurry = blurry.to(device)
            # The official prior tiles itself (LDM's split-input path, blended at every DDIM step).
            large = blurry.shape[-2] * blurry.shape[-1] > cfg.tile_above_pixels
            inference = tiled if large and model.prior == "paper_decoder" else whole
            with torch.no_grad():
                priors = inference(model, blurry).permute(0, 2, 3, 1).cpu().numpy()
            for index, prior in zip(indices, priors, strict=True):
                manifest["priors"][names[index]] = write_image(prior_path(folder, names[index]), prior, PRIOR_BIT_DEPTH).name
            # Once per batch: a resumed run re-lists the priors on disk, so nothing is lost in between.
            write_manifest(manifest_file, manifest)
            progress.advance(task, len(indices))
    write_manifest(manifest_file, manifest)
    skipped = len(names) - len(todo)
    console.print(f"{len(todo)} priors written, {skipped} already there, in {folder}", highlight=False)
    return len(todo), skipped


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate_prior")
@report_errors
def main(cfg: DictConfig) -> None:
    generate_priors(cfg)


if __name__ == "__main__":
    main()
