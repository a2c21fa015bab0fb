import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deblur_diffusion.models import Restormer
from deblur_diffusion.models.blocks import CHANNEL_ATTENTION_FORMS, MDTA, ChannelLayerNorm, set_channel_attention

# The official Restormer (restormer_arch.py, paper configuration) counted at 3x256x256 (6 channels dual-pixel).
PAPER_PARAMS = 26_126_644
PAPER_DUAL_PIXEL_PARAMS = 26_132_548
PAPER_GMACS_256 = 154.88


def load_fixture(parity_dir, name):
    folder = parity_dir / name
    config = json.loads((folder / "config.json").read_text())
    model = Restormer(**config["kwargs"]).eval()
    model.load_state_dict(torch.load(folder / "net_g.pth", weights_only=True)["params"], strict=True)
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    return model, inputs, outputs


@pytest.mark.parametrize("attention", CHANNEL_ATTENTION_FORMS)
@pytest.mark.parametrize("name", ["restormer", "restormer_dual_pixel"])
def test_official_checkpoint_reproduces_official_outputs(parity_dir, name, attention):
    model, inputs, outputs = load_fixture(parity_dir, name)
    set_channel_attention(model, attention)
    with torch.no_grad():
        restored = model(inputs["lq"])
    assert restored.shape == outputs["out"].shape
    assert (restored - outputs["out"]).abs().max().item() < 1e-5


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_configuration_parameter_counts():
    assert count(Restormer()) == PAPER_PARAMS
    assert count(Restormer(inp_channels=6, dual_pixel_task=True)) == PAPER_DUAL_PIXEL_PARAMS


def test_paper_configuration_macs_at_256():
    with torch.device("meta"):
        model = Restormer()
        image = torch.zeros(1, 3, 256, 256)
    with FlopCounterMode(display=False) as counter:
        model(image)
    gmacs = counter.get_total_flops() / 2e9
    assert gmacs == pytest.approx(PAPER_GMACS_256, rel=5e-3)


def tiny(**kwargs):
    options = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])
    return Restormer(**{**options, **kwargs})


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (9, 15), (1, 1)])
def test_any_input_size_gives_same_size_and_aligned_residual(size):
    model = tiny().eval()
    torch.nn.init.zeros_(model.output.weight)
    image = torch.rand(2, 3, *size)
    with torch.no_grad():
        restored = model(image)
    # With a zero output head the network is the identity: padding and cropping must line up.
    assert torch.equal(restored, image)


def test_dual_pixel_variant_predicts_three_channels_without_residual():
    model = tiny(inp_channels=6, dual_pixel_task=True).eval()
    torch.nn.init.zeros_(model.output.weight)
    with torch.no_grad():
        restored = model(torch.rand(1, 6, 24, 40))
    assert restored.shape == (1, 3, 24, 40)
    assert torch.count_nonzero(restored) == 0


def test_wrong_channel_count_is_rejected_with_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny()(torch.rand(1, 4, 16, 16))


def test_bias_free_layer_norm_matches_definition():
    norm = ChannelLayerNorm(5, with_bias=False)
    torch.nn.init.uniform_(norm.body.weight, 0.5, 1.5)
    x = torch.randn(2, 5, 3, 4) + 3.0
    variance = x.var(dim=1, keepdim=True, unbiased=False)
    expected = x / torch.sqrt(variance + 1e-5) * norm.body.weight.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_with_bias_layer_norm_matches_definition():
    norm = ChannelLayerNorm(5, with_bias=True)
    torch.nn.init.uniform_(norm.body.weight, 0.5, 1.5)
    torch.nn.init.uniform_(norm.body.bias, -1, 1)
    x = torch.randn(2, 5, 3, 4) + 3.0
    mean = x.mean(dim=1, keepdim=True)
    variance = x.var(dim=1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(variance + 1e-5) * norm.body.weight.view(1, -1, 1, 1) + norm.body.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_mdta_matches_explicit_transposed_attention():
    attention = MDTA(dim=8, num_heads=2, bias=True)
    torch.nn.init.uniform_(attention.temperature, 0.5, 2.0)
    x = torch.randn(1, 8, 5, 6)
    q, k, v = attention.qkv_dwconv(attention.qkv(x)).chunk(3, dim=1)
    heads = []
    for h in range(2):
        qh, kh, vh = (t[0, h * 4 : (h + 1) * 4].reshape(4, -1) for t in (q, k, v))
        qh = qh / qh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kh = kh / kh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        weights = torch.softmax(qh @ kh.T * attention.temperature[h], dim=-1)
        heads.append((weights @ vh).reshape(4, 5, 6))
    expected = attention.project_out(torch.cat(heads).unsqueeze(0))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)
