"""Reading weights from this project's Lightning checkpoints and from the official ``.pth`` files.

Everything is read with ``torch.load(..., weights_only=True)``. Errors name the file and the keys
that do not fit, instead of a shape error from inside ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from deblur_diffusion.errors import DeblurError

# Where the official BasicSR-style files keep their weights, most preferred first.
OFFICIAL_PARAM_KEYS = ("params_ema", "params")
MAX_LISTED_KEYS = 8
# The stage's EMA copy (``ema.module.*`` in a checkpoint) and, under this checkpoint key, the part
# of the stage's ``net`` it averages ("" or absent: all of it).
EMA_PREFIX = "ema.module."
EMA_PART_KEY = "deblur_diffusion_ema_part"


class CheckpointError(DeblurError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def unreadable(path: str | Path, error: Exception) -> CheckpointError:
    """The error for a file ``torch.load(..., weights_only=True)`` refused. Only torch's first line
    is kept: the rest advises loading with ``weights_only=False``, i.e. running whatever code the
    file holds, which this package never does."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip() and "weights_only" not in line), type(error).__name__)
    return CheckpointError(f"{path} is not a checkpoint of this package or an official release ({reason})")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The whole checkpoint dictionary (weights only, no pickled code); ``mmap=True`` maps the
    tensors instead of reading them (for a look at a checkpoint's records before Lightning loads it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise unreadable(path, error) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dictionary of weights")
    return checkpoint


def official_weights(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of an official release file (``{'params': ...}`` and/or ``{'params_ema': ...}``,
    or a bare state dict) and the key they were read from: ``params_ema`` when present unless
    ``ema=False``, else ``params`` (``"state_dict"`` for a bare one)."""
    checkpoint = read_checkpoint(path)
    for key in OFFICIAL_PARAM_KEYS if ema else OFFICIAL_PARAM_KEYS[1:]:
        if key in checkpoint:
            return checkpoint[key], key
    if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint, "state_dict"
    raise CheckpointError(f"{path} has none of the keys {OFFICIAL_PARAM_KEYS[: 1 + ema]} and is not a plain state dict")


def official_state_dict(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights of :func:`official_weights`, without the key."""
    return official_weights(path, ema)[0]


def stage_weights(checkpoint: dict, part: str, ema: bool, source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights of the stage's submodule ``part`` (``net``, ``net.transformer``...) in a loaded
    Lightning checkpoint of this project, and whether EMA weights are among them: with ``ema``,
    the EMA copy's weights replace the raw ones wherever it averaged them (a stage's frozen parts
    are not in its EMA and come as trained, i.e. unchanged)."""
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{source} is not a Lightning checkpoint (no 'state_dict')")
    state = dict(checkpoint["state_dict"])
    averaged_part = ".".join(filter(None, ("net", checkpoint.get(EMA_PART_KEY, ""))))
    averaged = {f"{averaged_part}.{key[len(EMA_PREFIX) :]}": value for key, value in state.items() if key.startswith(EMA_PREFIX)}
    inside = part + "."
    used_ema = ema and any(key.startswith(inside) for key in averaged)
    if used_ema:
        state.update(averaged)
    selected = {key[len(inside) :]: value for key, value in state.items() if key.startswith(inside)}
    if not selected:
        raise CheckpointError(f"{source} has no weights under '{part}' (it holds {listing(state)})")
    return selected, used_ema


def lightning_weights(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (e.g. ``net.transformer``) in a Lightning checkpoint of this
    project, from the EMA copy where the run kept one."""
    return stage_weights(read_checkpoint(path), prefix, ema=True, source=str(path))[0]


def mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], reshaped: Sequence[str] = ()) -> list[str]:
    """The missing, unexpected and mis-shaped keys of ``state`` against ``expected``, one phrase
    each (empty when it fits); keys in ``reshaped`` may differ in shape."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} (model: {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape and key not in reshaped
    ]
    return [
        f"{label} {listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` into ``module`` strictly; mismatches are reported by key, naming ``source``."""
    problems = mismatches(module.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: " + "; ".join(problems) + ". Is it the same architecture and configuration?"
        )
    module.load_state_dict(state)


def listing(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return f"{len(keys)} keys: {shown}" + (", ..." if len(keys) > MAX_LISTED_KEYS else "")
