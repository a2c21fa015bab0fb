"""Precomputed diffusion priors (``python -m deblur_diffusion.generate_prior``) read with the pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.data.io import read_image_raw
from deblur_diffusion.data.sources import PairPlanes, PairSource, StoredPairSource
from deblur_diffusion.data.synthetic import SyntheticPairs
from deblur_diffusion.errors import ConfigError, DatasetLayoutError, ImageReadError, PairMismatchError

PRIOR_SUFFIX = ".png"
# generate_prior's record of a prior folder, and the settings in it that the priors depend on
# (generate_prior.prior_settings: the model's files by content digest, the prior, T, seed, eta,
# and the inference: tiles and self-ensemble).
PRIOR_MANIFEST = "manifest.json"
PRIOR_SETTINGS = ("ckpt_sha256", "ldm_config_sha256", "prior", "steps", "seed", "eta", "inference")


def prior_path(prior_dir: str | Path, name: str) -> Path:
    return Path(prior_dir) / f"{name}{PRIOR_SUFFIX}"


def require_fixed_pairs(source: PairSource) -> None:
    """Precomputed priors need pairs that are the same at every epoch."""
    if isinstance(source, SyntheticPairs) and source.split == "train":
        raise ConfigError(
            "synthetic training pairs are blurred anew at every epoch, so precomputed priors cannot match them: "
            "write a fixed dataset with python -m deblur_diffusion.data.synthesize, or use the online prior "
            "(model=swintormer_online_prior)"
        )


class WithPrior(StoredPairSource):
    """Appends each pair's prior image (``prior_dir/<pair name>.png``, 16-bit) to its input
    channels, so that crops and augmentations cut image and prior alike."""

    def __init__(self, source: PairSource, prior_dir: str | Path):
        require_fixed_pairs(source)
        self.prior_dir = Path(prior_dir)
        self.source = source
        self.in_channels = source.in_channels + IMAGE_CHANNELS
        self.read_8bit = source.read_8bit

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def bit_depth(self, index: int) -> int:
        return self.source.bit_depth(index)

    def file_suffix(self, index: int) -> str:
        return self.source.file_suffix(index)

    def files(self, index: int) -> list[Path]:
        return [*self.source.files(index), prior_path(self.prior_dir, self.name(index))]

    def load_planes(self, index: int, rng: np.random.Generator | None = None) -> PairPlanes:
        planes = self.source.load_planes(index, rng)
        path = prior_path(self.prior_dir, self.name(index))
        if not path.is_file():
            raise ImageReadError(f"no prior for pair {self.name(index)!r}: {path} is missing (run generate_prior on this split)")
        prior = read_image_raw(path)
        if prior.shape != planes.target.shape:
            raise PairMismatchError(
                f"prior {path} is {prior.shape[1]}x{prior.shape[0]} but its pair is {planes.target.shape[1]}x{planes.target.shape[0]}"
            )
        return PairPlanes([*planes.inputs, prior], planes.target)

    def sharpness_target(self, index: int):
        return self.source.sharpness_target(index)

    def describe(self) -> str:
        return f"{self.source.describe()} + priors from {self.prior_dir}"

    def provenance(self) -> dict:
        """The pairs' provenance and the settings the priors were generated with (from
        generate_prior's manifest), so that the prior folder may move but not change; priors
        written otherwise are identified by their folder."""
        self._require_prior_dir()  # named as missing, not as a store made with other settings
        manifest = self.prior_dir / PRIOR_MANIFEST
        if manifest.is_file():
            written = json.loads(manifest.read_text())
            priors = {key: written.get(key) for key in PRIOR_SETTINGS}
        else:
            priors = {"folder": str(self.prior_dir)}
        return {**self.source.provenance(), "priors": priors}

    def verify(self) -> None:
        self.source.verify()
        self._require_prior_dir()

    def _require_prior_dir(self) -> None:
        if not self.prior_dir.is_dir():
            raise DatasetLayoutError(
                f"prior folder {self.prior_dir} does not exist; write it with "
                "python -m deblur_diffusion.generate_prior ckpt=<ldm_decoder_finetune .ckpt> data=... out=..."
            )
