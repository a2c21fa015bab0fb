"""What FSDP shards as one unit: the repeated blocks of each architecture."""

from __future__ import annotations

from torch import nn

from deblur_diffusion.models.blocks import TransformerBlock
from deblur_diffusion.models.swintormer import SwintormerBlock


def block_wrap_policy() -> set[type[nn.Module]]:
    """Module classes that ``FSDPStrategy(auto_wrap_policy=...)`` wraps one by one: the transformer
    blocks of Restormer and HI-Diff (modulated blocks are subclasses) and Swintormer's blocks."""
    return {TransformerBlock, SwintormerBlock}
