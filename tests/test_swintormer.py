import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deblur_diffusion.models import Swintormer, swintormer
from deblur_diffusion.models.swintormer import MixedWindowAttention, shift_window_mask, softmax_one

# The official Swintormer_arch.py defaults at 6x256x256, and the depths [4, 6, 6, 8] the paper text gives.
OFFICIAL_PARAMS = 25_177_224
OFFICIAL_GMACS = 33.15
PAPER_TEXT_PARAMS = 25_933_332
PAPER_TEXT_GMACS = 41.50


def tiny(**kwargs):
    options = dict(inp_channels=3, dim=8, num_blocks=[2, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4], window_size=4)
    return Swintormer(**{**options, **kwargs})


def test_official_checkpoint_reproduces_official_outputs(parity_dir):
    folder = parity_dir / "swintormer"
    model = Swintormer(**json.loads((folder / "config.json").read_text())["kwargs"]).eval()
    model.load_state_dict(torch.load(folder / "net_g.pth", weights_only=True)["params"], strict=True)
    lq = torch.load(folder / "inputs.pt", weights_only=True)["lq"]
    expected = torch.load(folder / "outputs.pt", weights_only=True)["out"]
    with torch.no_grad():
        restored = model(lq)
    assert (restored - expected).abs().max().item() < 1e-5


def gmacs(model, channels=6):
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, 256, 256, device="meta"))
    return counter.get_total_flops() / 2e9


def test_parameter_counts_and_macs_of_the_paper_configurations():
    official = Swintormer()
    assert sum(p.numel() for p in official.parameters()) == OFFICIAL_PARAMS
    assert gmacs(official.to("meta")) == pytest.approx(OFFICIAL_GMACS, rel=5e-3)
    paper_text = Swintormer(num_blocks=[4, 6, 6, 8])
    assert sum(p.numel() for p in paper_text.parameters()) == PAPER_TEXT_PARAMS
    assert gmacs(paper_text.to("meta")) == pytest.approx(PAPER_TEXT_GMACS, rel=5e-3)


@pytest.mark.parametrize("channels", [3, 6, 9])
@pytest.mark.parametrize("size", [(100, 140), (37, 53), (5, 7)])
def test_any_size_and_channel_count_with_the_residual_from_the_first_three_channels(channels, size):
    model = tiny(inp_channels=channels).eval()
    torch.nn.init.zeros_(model.output[0].weight)
    image = torch.rand(2, channels, *size)
    with torch.no_grad():
        restored = model(image)
    assert restored.shape == (2, 3, *size)
    torch.testing.assert_close(restored, image[:, :3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [4, 2, 12 + 1])
def test_channel_counts_that_are_not_whole_images_are_rejected(channels):
    with pytest.raises(ValueError, match="inp_channels"):
        tiny(inp_channels=channels)


@pytest.mark.parametrize("kept", [True, False])
def test_shift_mask_separates_exactly_the_pixels_that_wrapped_around(kept, monkeypatch):
    if not kept:  # the path of the masks too large to keep (whole-image inference)
        monkeypatch.setattr(swintormer, "_CACHED_MASK_BYTES", 0)
    height, width, window, shift = 8, 12, 4, 2
    mask = shift_window_mask(height, width, window, shift, torch.device("cpu"))
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    # A rolled position came from the other side of the image iff it is among the last `shift` rows/columns.
    wrapped = torch.stack([rows >= height - shift, cols >= width - shift], dim=-1)
    windows = wrapped.view(height // window, window, width // window, window, 2).permute(0, 2, 1, 3, 4)
    windows = windows.reshape(-1, window * window, 2)
    same_side = (windows[:, :, None, :] == windows[:, None, :, :]).all(-1)
    assert torch.equal(mask == 0, same_side)
    assert torch.all(mask[~same_side] == -100)


def test_shift_masks_are_kept_for_patch_sizes_but_not_for_whole_images(monkeypatch):
    cpu = torch.device("cpu")
    # 4 x 4 windows of 64 tokens take 4 x 4 x 64^2 x 4 bytes = 256 KiB: kept up to that size.
    monkeypatch.setattr(swintormer, "_CACHED_MASK_BYTES", 256 * 2**10)
    patch = shift_window_mask(32, 32, 8, 4, cpu)
    assert shift_window_mask(32, 32, 8, 4, cpu) is patch
    whole_image = shift_window_mask(40, 40, 8, 4, cpu)
    assert shift_window_mask(40, 40, 8, 4, cpu) is not whole_image


def isolated_spatial_attention(shift):
    """A shifted attention whose q/k/v depend on each pixel alone and whose output keeps only the
    spatial (masked) half, so that the mask is the only thing between the two sides of the border."""
    torch.manual_seed(0)
    attention = MixedWindowAttention(dim=8, num_heads=1, bias=False, window_size=4, shift_size=shift)
    with torch.no_grad():
        attention.qkv_dwconv.weight.zero_()
        attention.qkv_dwconv.weight[:, :, 1, 1] = 1.0
        attention.project_out.weight[:, 4:] = 0.0
    return attention


def test_a_shifted_block_does_not_mix_pixels_across_the_image_border():
    attention = isolated_spatial_attention(shift=2)
    image = torch.randn(1, 8, 8, 8)
    perturbed_top = image.clone()
    perturbed_top[:, :, :2] += 10.0
    perturbed_near = image.clone()
    perturbed_near[:, :, 7, 3] += 10.0
    with torch.no_grad():
        reference = attention(image)
        after_top = attention(perturbed_top)
        after_near = attention(perturbed_near)
    # The bottom rows share a shifted window with the top rows but must ignore them...
    torch.testing.assert_close(after_top[:, :, 6:], reference[:, :, 6:], atol=1e-6, rtol=0)
    # ...while they do attend to their real neighbours.
    assert (after_near[:, :, 6, :4] - reference[:, :, 6, :4]).abs().max() > 1e-3


def test_softmax_one_matches_its_definition():
    scores = torch.randn(3, 5) * 4
    expected = torch.exp(scores) / (torch.exp(scores.max(dim=-1, keepdim=True).values) + torch.exp(scores).sum(-1, keepdim=True))
    torch.testing.assert_close(softmax_one(scores), expected)


def test_fused_softmax_variant_matches_explicit_attention():
    attention = MixedWindowAttention(dim=8, num_heads=2, bias=False, window_size=4, shift_size=2, attention_softmax="softmax")
    q, k, v = torch.randn(3, 2, 2, 16, 4).unbind(0)
    additive = torch.randn(2, 16, 16)
    expected = torch.softmax(q @ k.transpose(-2, -1) + additive, dim=-1) @ v
    torch.testing.assert_close(attention._attend(q, k, v, [additive]), expected, atol=1e-5, rtol=1e-5)


def official_softmax_one(x):
    """The official expression, differentiated by autograd (the max's gradient goes to the first maximum)."""
    x = x - x.max(dim=-1, keepdim=True).values
    exp_x = torch.exp(x)
    return exp_x / (1 + exp_x.sum(dim=-1, keepdim=True))


def test_softmax_one_gradient_equals_autograd_of_the_official_expression_with_tied_maxima():
    torch.manual_seed(0)
    scores = torch.randn(4, 3, 7, dtype=torch.float64) * 3
    scores[0, 0, 2] = scores[0, 0, 5] = scores[0, 0].max() + 1  # a row with two maxima
    scores[1, 1] = 0.5  # a constant row
    grad = torch.randn_like(scores)
    ours, official = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    softmax_one(ours).backward(grad)
    official_softmax_one(official).backward(grad)
    torch.testing.assert_close(ours.grad, official.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(softmax_one, (torch.randn(2, 5, dtype=torch.float64, requires_grad=True),))


def test_fused_softmax_variant_with_batch_windows_and_shift_mask_matches_explicit_attention():
    attention = MixedWindowAttention(dim=8, num_heads=2, bias=False, window_size=4, shift_size=2, attention_softmax="softmax")
    q, k, v = torch.randn(3, 2, 4, 2, 16, 4).unbind(0)  # (batch, windows, heads, tokens, channels)
    bias, mask = torch.randn(2, 16, 16), shift_window_mask(8, 8, 4, 2, torch.device("cpu")).unsqueeze(1)
    expected = torch.softmax(q @ k.transpose(-2, -1) + bias + mask, dim=-1) @ v
    torch.testing.assert_close(attention._attend(q, k, v, [bias, mask]), expected, atol=1e-5, rtol=1e-5)
