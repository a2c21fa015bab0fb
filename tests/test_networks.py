"""The same checks on every network: any input size, gradients everywhere, activation
checkpointing, and the official release format through export and ``load_pretrained``."""

import pytest
import torch
from hydra.errors import InstantiationException
from networks import LEVELLED, TINY_CONFIGS, tiny_inputs, tiny_network

from deblur_diffusion import load_pretrained
from deblur_diffusion.export import export, save_official

NAMES = list(TINY_CONFIGS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(7, 13), (32, 40)])
def test_any_input_size_gives_an_output_of_that_size(name, size):
    torch.manual_seed(0)
    network = tiny_network(name).eval()
    with torch.no_grad():
        restored = network(*tiny_inputs(name, network, *size))
    assert restored.shape == (2, 3, *size) and torch.isfinite(restored).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    network = tiny_network(name)
    network(*tiny_inputs(name, network, 16, 24)).square().mean().backward()
    missing = [key for key, p in network.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


@pytest.mark.parametrize("name", LEVELLED)
def test_activation_checkpointing_keeps_outputs_and_gradients(name):
    torch.manual_seed(0)
    plain = tiny_network(name)
    checkpointed = tiny_network(name, checkpoint_levels=["encoder_level2", "latent", "refinement"])
    checkpointed.load_state_dict(plain.state_dict())
    inputs = tiny_inputs(name, plain, 24, 24)
    outputs = [network(*inputs) for network in (plain, checkpointed)]
    for out in outputs:
        out.square().mean().backward()
    torch.testing.assert_close(outputs[0], outputs[1])
    for (key, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=key)
    with pytest.raises(InstantiationException, match="unknown checkpoint_levels"):
        tiny_network(name, checkpoint_levels=["level9"])


@pytest.mark.parametrize("name", [name for name in NAMES if name != "hidiff_transformer"])
def test_official_files_export_and_load_back_with_the_same_outputs(tmp_path, name):
    torch.manual_seed(0)
    network = tiny_network(name).eval()
    written = save_official(network, tmp_path / "official")
    parts = {part: str(tmp_path / "official" / f"{stem}.pth") for part, stem in network.official_files.items()}
    weights = parts[""] if list(parts) == [""] else parts
    assert sorted(p.name for p in written) == sorted(f"{stem}.pth" for stem in network.official_files.values())
    folder = export(weights, tmp_path / "export", TINY_CONFIGS[name])
    restorer = load_pretrained(folder)
    (image,) = tiny_inputs(name, network, 20, 28)
    blurry, sharp = (image[:, :3], image[:, 3:]) if network.needs_sharp_input else (image, None)
    with torch.no_grad():
        expected = network(image).clamp(0, 1)
    torch.testing.assert_close(restorer.restore(blurry, sharp), expected, rtol=0, atol=0)
