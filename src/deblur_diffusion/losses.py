"""Training losses: pixel losses and the VGG19 perceptual loss of the Swintormer paper."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg19

from deblur_diffusion.errors import ConfigError, DeblurError

# Index of each conv layer in torchvision's vgg19().features (features are taken before the ReLU).
VGG19_CONV_INDEX = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14, "conv3_4": 16,
    "conv4_1": 19, "conv4_2": 21, "conv4_3": 23, "conv4_4": 25,
    "conv5_1": 28, "conv5_2": 30, "conv5_3": 32, "conv5_4": 34,
}  # fmt: skip
PAPER_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_4")
VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"
VGG19_WEIGHTS_URL = f"https://download.pytorch.org/models/{VGG19_WEIGHTS_FILE}"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class CharbonnierLoss(nn.Module):
    """mean(sqrt((x - y)^2 + eps^2)): a differentiable L1 that is quadratic near zero."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((prediction - target) ** 2 + self.eps**2).mean()


class MissingWeightsError(DeblurError):
    """Pretrained weights that must be placed on disk by hand are not there."""


def default_vgg19_weights_path() -> Path:
    """Where torchvision caches the ImageNet VGG19 weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_WEIGHTS_FILE


def load_vgg19_weights(weights_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The torchvision ImageNet VGG19 state dict from ``weights_path`` or torchvision's cache."""
    path = Path(weights_path) if weights_path else default_vgg19_weights_path()
    if not path.is_file():
        raise MissingWeightsError(
            f"VGG19 weights for the perceptual loss not found at {path}. Download {VGG19_WEIGHTS_URL} and put it "
            f"there (torchvision's cache, {default_vgg19_weights_path()}), or set model.loss.weights_path to the file."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _parameters_to_buffers(module: nn.Module) -> None:
    """Turns every parameter into a non-persistent buffer: frozen, moved with the module, not
    optimised and not written into checkpoints."""
    for submodule in module.modules():
        for name, parameter in list(submodule.named_parameters(recurse=False)):
            delattr(submodule, name)
            submodule.register_buffer(name, parameter.detach(), persistent=False)


class PerceptualLoss(nn.Module):
    """Weighted L1 distance between VGG19 features (before ReLU) of prediction and target.

    Inputs are RGB in [0, 1], normalised with the ImageNet statistics. ``pretrained=False`` uses
    randomly initialised VGG weights (for tests and for users who only need the plumbing).
    """

    def __init__(
        self,
        layers: Sequence[str] = PAPER_LAYERS,
        layer_weights: Sequence[float] | None = None,
        weights_path: str | Path | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        unknown = [layer for layer in layers if layer not in VGG19_CONV_INDEX]
        if unknown or not layers:
            raise ConfigError(f"unknown VGG19 layers {unknown or list(layers)}; choose from {list(VGG19_CONV_INDEX)}")
        weights = list(layer_weights) if layer_weights is not None else [1.0] * len(layers)
        if len(weights) != len(layers):
            raise ConfigError(f"{len(layers)} layers but {len(weights)} layer_weights")
        network = vgg19(weights=None)
        if pretrained:
            network.load_state_dict(load_vgg19_weights(weights_path))
        last = max(VGG19_CONV_INDEX[layer] for layer in layers)
        self.features = network.features[: last + 1]
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                # In place, a ReLU would overwrite the pre-activation features kept for the loss.
                layer.inplace = False
        _parameters_to_buffers(self.features)
        self.layer_weights = {VGG19_CONV_INDEX[layer]: weight for layer, weight in zip(layers, weights, strict=True)}
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def extract(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        x = (image - self.mean) / self.std
        taken = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.layer_weights:
                taken[index] = x
        return taken

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        predicted = self.extract(prediction)
        with torch.no_grad():
            reference = self.extract(target)
        return sum(weight * torch.nn.functional.l1_loss(predicted[index], reference[index]) for index, weight in self.layer_weights.items())


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i(prediction, target), e.g. L1 + 0.01 * perceptual."""

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        if set(losses) != set(weights):
            raise ConfigError(f"losses {sorted(losses)} and weights {sorted(weights)} must name the same terms")
        self.terms = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * loss(prediction, target) for name, loss in self.terms.items())
