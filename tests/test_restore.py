"""Restoring photos: reduced precision against fp32, the out-of-memory fallback, EXIF orientation
and ICC profiles through ``predict``."""

import logging

import numpy as np
import pytest
import torch
from conftest import compose_config
from networks import TINY_UNET
from PIL import Image, ImageCms, ImageOps

from deblur_diffusion import load_pretrained
from deblur_diffusion.inference import Inference
from deblur_diffusion.models import Restormer
from deblur_diffusion.restorer import Restorer

# bf16 against fp32 on the official-code parity fixtures (tiny configs, the official weights):
# the largest difference of a restored value in [0, 1] stays below this (README: precision).
BF16_TOLERANCE = 0.03


@pytest.mark.parametrize(("name", "overrides"), [("restormer", None), ("restormer_dual_pixel", None), ("swintormer", {"window_size": 4})])
def test_bf16_restores_within_the_stated_tolerance_of_fp32(parity_dir, name, overrides):
    lq = torch.load(parity_dir / name / "inputs.pt", weights_only=True)["lq"]
    full = load_pretrained(parity_dir / name / "net_g.pth", overrides, device="cpu").restore(lq)
    half = load_pretrained(parity_dir / name / "net_g.pth", overrides, device="cpu", precision="bf16").restore(lq)
    assert half.dtype == torch.float32
    error = (half - full).abs().max().item()
    assert 0 < error < BF16_TOLERANCE, error  # bf16 did run (not fp32), and stays close


class RunsOutOfMemory(torch.nn.Module):
    """A network on a device that holds at most ``limit`` pixels per call."""

    input_channels, needs_sharp_input = 3, False

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if x.shape[0] * x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.net(x)


def test_running_out_of_memory_falls_back_to_smaller_tiles(caplog):
    torch.manual_seed(0)
    net = Restormer(**TINY_UNET).eval()
    image = torch.rand(1, 3, 80, 72)
    restorer = Restorer(RunsOutOfMemory(net, 64 * 64), Inference("whole", tile_size=128, stride=112, tile_batch_size=4), device="cpu")
    with caplog.at_level(logging.WARNING, logger="deblur_diffusion"):
        restored = restorer.restore(image)
    expected = Inference("tiles", tile_size=64, stride=56, tile_batch_size=1)(net, image).clamp(0, 1)
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)
    assert [record.getMessage().split(";")[0] for record in caplog.records] == [
        "out of memory on the whole image",
        "out of memory on 128 px tiles",
        "out of memory on 128 px tiles",
    ]
    hopeless = Restorer(RunsOutOfMemory(net, 32 * 32), Inference("tiles", tile_size=64, stride=64, tile_batch_size=1), device="cpu")
    with pytest.raises(Exception, match="ran out of memory even on 64 px tiles, one per call"):
        hopeless.restore(image)


def test_predict_restores_photos_upright_and_keeps_their_colour_profile(tmp_path):
    from deblur_diffusion.predict import predict

    torch.manual_seed(0)
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / "net_g.pth")
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored on its side: viewers turn it 90 degrees clockwise
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "phone.png", exif=exif, icc_profile=profile)
    photo.save(tmp_path / "in" / "plain.png")
    cfg = compose_config("predict", tmp_path, f"ckpt={tmp_path / 'net_g.pth'}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}")
    written, failures = predict(cfg)
    assert not failures and len(written) == 2
    with Image.open(tmp_path / "in" / "phone.png") as stored:
        upright = ImageOps.exif_transpose(stored).convert("RGB")
    expected = load_pretrained(tmp_path / "net_g.pth", device="cpu").restore_image(upright)
    with Image.open(tmp_path / "out" / "phone.png") as restored:
        assert restored.size == (24, 40)  # upright: width and height swapped
        assert restored.info.get("icc_profile") == profile
        np.testing.assert_array_equal(np.asarray(restored.convert("RGB")), np.asarray(expected))
    with Image.open(tmp_path / "out" / "plain.png") as plain:
        assert plain.size == (40, 24) and "icc_profile" not in plain.info
