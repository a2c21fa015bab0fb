import pytest
import torch
from torchvision.models import vgg19

from deblur_diffusion.errors import ConfigError
from deblur_diffusion.losses import MissingWeightsError, PerceptualLoss, WeightedSum


def test_perceptual_loss_with_random_weights_is_zero_on_equal_images_and_has_gradients():
    torch.manual_seed(0)
    loss = PerceptualLoss(pretrained=False)
    target = torch.rand(2, 3, 32, 32)
    prediction = target.clone().requires_grad_(True)
    assert loss(prediction, target).item() == 0.0
    value = loss(prediction + 0.1 * torch.randn_like(target), target)
    value.backward()
    assert value.item() > 0 and prediction.grad.abs().sum() > 0


def test_vgg_is_frozen_and_kept_out_of_checkpoints():
    loss = PerceptualLoss(pretrained=False)
    assert list(loss.parameters()) == []
    assert loss.state_dict() == {}


def test_features_match_torchvision_vgg19_loaded_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    reference = vgg19(weights=None).eval()
    path = tmp_path / "vgg19.pth"
    torch.save(reference.state_dict(), path)
    loss = PerceptualLoss(layers=["conv2_1", "conv5_4"], weights_path=path)
    image = torch.rand(1, 3, 32, 32)
    normalised = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = loss.extract(image)
        torch.testing.assert_close(features[5], reference.features[:6](normalised))
        torch.testing.assert_close(features[34], reference.features[:35](normalised))


def test_missing_weights_say_which_file_to_put_where(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"vgg19-dcbb9e9d\.pth.*weights_path") as error:
        PerceptualLoss(weights_path=tmp_path / "none.pth")
    assert str(tmp_path / "none.pth") in str(error.value)


def test_unknown_layer_is_rejected():
    with pytest.raises(ConfigError, match="conv9_9"):
        PerceptualLoss(layers=["conv9_9"], pretrained=False)


def test_weighted_sum_adds_weighted_terms():
    prediction, target = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    combined = WeightedSum({"l1": torch.nn.L1Loss(), "l2": torch.nn.MSELoss()}, {"l1": 2.0, "l2": 0.5})
    expected = 2.0 * torch.nn.functional.l1_loss(prediction, target) + 0.5 * torch.nn.functional.mse_loss(prediction, target)
    torch.testing.assert_close(combined(prediction, target), expected)
