"""Starting a training stage from weights: warm starts of its parts (the released LDM-BSR for the
prior, a trained autoencoder, a stage-one checkpoint) and ``model.init_ckpt`` fine-tuning from released
or trained weights, where a file that reads fewer input channels is widened.

Never applied when a run resumes: the resumed checkpoint holds the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from deblur_diffusion.checkpoints import CheckpointError, lightning_weights, load_weights, mismatches, official_state_dict
from deblur_diffusion.weights import EXPORT_WEIGHTS


@dataclass(frozen=True)
class PartWeights:
    """Weights to start one part of a training stage from.

    Attributes:
        part: the submodule of the stage (``net.transformer``, ``latent_encoder``, ``net.prior``...).
        file: a Lightning checkpoint of this package (``.ckpt``: the weights under ``key``, from its
            EMA copy when the run kept one), an official release file (``.pth``: ``params_ema`` when
            it has one, else ``params``), an export folder of this package, a diffusers LDM folder
            (``key``: its ``vqvae`` or ``unet`` subfolder), or with ``compvis_config`` the CompVis
            ``model.ckpt`` of the released LDM-BSR (its EMA weights and noise schedule).
        key: see ``file``.
        compvis_config: the CompVis ``config.yaml`` that goes with ``file``.
        fine_tune: released or trained weights to fine-tune from (``model.init_ckpt``): mismatches
            are reported (:func:`load_for_fine_tuning`) and, unless ``strict``, the parts that do not
            fit keep the network's initialisation.
        strict: with ``fine_tune``, fail on missing, unexpected or mis-shaped keys.
    """

    part: str
    file: str
    key: str = ""
    compvis_config: str | None = None
    fine_tune: bool = False
    strict: bool = True


def fine_tuning_weights(init_ckpt: str | Mapping[str, str], part: str, strict: bool) -> list[PartWeights]:
    """Where ``model.init_ckpt`` starts the stage's ``part`` from: a file or folder for the whole
    part (a ``.ckpt`` of this package gives its ``net``), or official files by sub-part
    (``{transformer: net_g.pth, latent_encoder: net_le.pth}``)."""
    if isinstance(init_ckpt, Mapping):
        return [PartWeights(f"{part}.{sub}" if sub else part, str(file), fine_tune=True, strict=strict) for sub, file in init_ckpt.items()]
    key = "net" if Path(init_ckpt).suffix == ".ckpt" else ""
    return [PartWeights(part, str(init_ckpt), key, fine_tune=True, strict=strict)]


def _widens_input(file_value: torch.Tensor, model_value: torch.Tensor) -> bool:
    """A convolution whose file weights read fewer input channels than the model's, and nothing else differs."""
    return (
        file_value.ndim == model_value.ndim == 4
        and file_value.shape[1] < model_value.shape[1]
        and file_value.shape[:1] + file_value.shape[2:] == model_value.shape[:1] + model_value.shape[2:]
    )


def load_for_fine_tuning(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool) -> list[str]:
    """Loads released or trained weights to fine-tune ``module`` from; returns what to tell the user.

    A convolution of the file that reads fewer input channels (a single-image model started as
    dual-pixel, Swintormer's prior added) keeps the file's filters for the channels they share, and
    its filters for the new channels start at zero, so that the network starts as the file's. Missing,
    unexpected and mis-shaped keys fail, unless ``strict=False``: then they are reported and keep the
    network's initialisation.
    """
    expected = module.state_dict()
    shared = [key for key in expected if key in state]
    widened = [key for key in shared if state[key].shape != expected[key].shape and _widens_input(state[key], expected[key])]
    problems = mismatches(expected, state, widened)
    if problems and strict:
        raise CheckpointError(
            f"model.init_ckpt={source} does not fit {type(module).__name__}: "
            + "; ".join(problems)
            + ". Set model.init_strict=false to start those parameters from the network's initialisation."
        )
    loaded = dict(expected)
    for key in shared:
        if key in widened:
            value = torch.zeros_like(expected[key])
            value[:, : state[key].shape[1]] = state[key]
            loaded[key] = value
        elif state[key].shape == expected[key].shape:
            loaded[key] = state[key]
    module.load_state_dict(loaded)
    notes = [
        f"{key}: the file's filters for input channels 0-{state[key].shape[1] - 1} kept, channels "
        f"{state[key].shape[1]}-{expected[key].shape[1] - 1} start at zero"
        for key in widened
    ]
    if problems:
        notes.append("not loaded, left as initialised: " + "; ".join(problems))
    return notes


def _source_state(source: PartWeights) -> dict[str, torch.Tensor]:
    """The weights of a file or folder that is not a CompVis checkpoint."""
    path = Path(source.file)
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return load_file(path / EXPORT_WEIGHTS)
    if path.is_dir() or not path.suffix:  # a (diffusers) folder
        return _diffusers_weights(path, source.key)
    if path.suffix == ".ckpt":
        return lightning_weights(source.file, source.key)
    if path.suffix == ".safetensors":
        return load_file(path)
    return official_state_dict(source.file)


def warm_start(stage: nn.Module, sources: Sequence[PartWeights]) -> list[str]:
    """Loads each source into its part of ``stage``; every mismatch is named with the file.
    Returns notes for the user: what was loaded where, and what fine-tuning widened or left out."""
    notes = []
    for source in sources:
        module = stage.get_submodule(source.part)
        label = f"{source.file} ({source.key or 'as ' + source.part})"
        if source.compvis_config is not None:
            from deblur_diffusion.models.compvis_ldm import load_compvis_ldm

            released = load_compvis_ldm(source.file, source.compvis_config, use_ema=True)
            load_weights(module, released.state_dict(), label)
            # Not copied: the schedule is not saved in checkpoints, so a resumed run gets the configured one.
            if not torch.equal(module.alphas_cumprod.cpu(), released.alphas_cumprod):
                raise CheckpointError(f"{label}: the configured noise schedule is not the released one ({source.compvis_config})")
        elif source.fine_tune:
            notes += [f"{label}: {note}" for note in load_for_fine_tuning(module, _source_state(source), source.file, source.strict)]
        else:
            load_weights(module, _source_state(source), label)
        notes.append(f"{label}: loaded into {source.part or 'the network'}")
    return notes


def _diffusers_weights(folder: Path, subfolder: str) -> dict[str, torch.Tensor]:
    """The weights of a diffusers LDM folder's ``vqvae`` or ``unet`` (as the LDM super-resolution
    release ``CompVis/ldm-super-resolution-4x-openimages``)."""
    from diffusers import UNet2DModel, VQModel

    if not (folder / subfolder / "config.json").is_file():
        raise CheckpointError(
            f"no diffusers-format LDM weights in {folder}: expected {folder}/{{vqvae,unet}}/{{config.json, "
            "diffusion_pytorch_model.safetensors}}. Download CompVis/ldm-super-resolution-4x-openimages (git clone of its "
            "Hugging Face repository) on a machine with internet and copy the folder here. An original CompVis model.ckpt "
            "+ config.yaml loads directly with deblur_diffusion.models.load_compvis_ldm (generate_prior ldm_config=...)."
        )
    model_class = {"vqvae": VQModel, "unet": UNet2DModel}[subfolder]
    return model_class.from_pretrained(folder, subfolder=subfolder).state_dict()
