"""What every network declares to the code around it, so that loading, export, ``summary`` and
``evaluate`` read attributes instead of probing classes."""

from __future__ import annotations

from typing import ClassVar

from torch import nn


class RestorationNetwork(nn.Module):
    """Base class of the networks this package trains and runs.

    Attributes:
        input_channels: channels of the blurry input the network reads (the image, then extra views
            or a prior), set by each network.
        needs_sharp_input: the sharp image follows the blurry one in the input (HI-Diff stage one,
            whose latent encoder reads it at training and validation time).
        official_files: the authors' release files of the network, ``{part: file stem}`` (part ``""``
            is the whole network), each a ``{'params': state_dict}`` ``.pth``; empty when the authors
            release none in that format.
        released_parameters: parameter counts of the authors' released model per part, printed by
            ``summary`` beside the counts of the configured network.
        samples_noise: the network draws noise at inference from its ``noise_seed`` attribute
            (diffusion models), which the entry points set from their ``seed``.
    """

    input_channels: int = 3
    needs_sharp_input: ClassVar[bool] = False
    official_files: ClassVar[dict[str, str]] = {}
    released_parameters: ClassVar[dict[str, int]] = {}
    samples_noise: ClassVar[bool] = False
