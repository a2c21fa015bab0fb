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
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.inference import Inference
from deblur_diffusion.models import Restormer
from deblur_diffusion.restorer import Restorer, whole_image_budget

# bf16 against fp32 on the official-code parity fixtures (tiny configs, the official weights):
# the largest difference of a restored value in [0, 1] stays below this (docs/guides/inference.md: precision).
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


def test_the_whole_image_budget_is_given_or_measured_on_the_gpu():
    restorer = Restorer(Restormer(**TINY_UNET), device="cpu")
    assert whole_image_budget(restorer, 5000) == 5000
    assert whole_image_budget(restorer, "auto") == 2048 * 2048  # the CPU's allocator reports no peak
    with pytest.raises(ConfigError, match="max_pixels must be a positive number of pixels or 'auto', got 0"):
        whole_image_budget(restorer, 0)


@pytest.mark.gpu
def test_the_measured_gpu_budget_restores_an_image_of_that_size_whole():
    restorer = Restorer(Restormer(**TINY_UNET), device="cuda")
    budget = whole_image_budget(restorer, "auto")
    free, _ = torch.cuda.mem_get_info()
    assert 256 * 256 < budget < free  # at least one byte per pixel
    side = min(int(budget**0.5), 4096)
    torch.cuda.reset_peak_memory_stats()
    restorer.restore(torch.rand(1, 3, side, side))
    assert torch.cuda.max_memory_allocated() < free


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


def predict_in_process(tmp_path, *overrides):
    from deblur_diffusion.predict import predict

    return predict(compose_config("predict", tmp_path, f"output={tmp_path / 'out'}", "device=cpu", *overrides))


def test_predict_restores_a_dual_pixel_folder_pair_by_pair(tmp_path):
    from deblur_diffusion.data.io import read_image_raw, write_image
    from deblur_diffusion.errors import ConfigError

    torch.manual_seed(0)
    net = Restormer(**TINY_UNET, inp_channels=6, dual_pixel_task=True).eval()
    torch.save({"params": net.state_dict()}, tmp_path / "dual.pth")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for view in "LR":
            write_image(tmp_path / "pairs" / f"input{view}" / f"{name}.png", rng.random((24, 32, 3)), 16)
    written, failures = predict_in_process(tmp_path, f"ckpt={tmp_path / 'dual.pth'}", f"input={tmp_path / 'pairs'}")
    assert not failures and sorted(path.name for path in written) == ["a.png", "b.png"]
    left, right = (read_image_raw(tmp_path / "pairs" / f"input{view}" / "a.png") / 65535.0 for view in "LR")
    pair = torch.from_numpy(np.concatenate([left, right], axis=2).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net(pair).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    restored = read_image_raw(tmp_path / "out" / "a.png")
    assert restored.dtype == np.uint16
    np.testing.assert_allclose(restored / 65535.0, expected, atol=1 / 65535)
    swapped = tmp_path / "swapped"
    predict_in_process(swapped.parent, f"ckpt={tmp_path / 'dual.pth'}", f"input={tmp_path / 'pairs'}", "views=[r,l]", f"output={swapped}")
    assert not np.array_equal(read_image_raw(swapped / "a.png"), restored)
    (tmp_path / "pairs" / "inputR" / "b.png").unlink()
    with pytest.raises(ConfigError, match=r"pair 'b' has no .*inputR/b\.\*"):
        predict_in_process(tmp_path, f"ckpt={tmp_path / 'dual.pth'}", f"input={tmp_path / 'pairs'}")
    write_image(tmp_path / "pairs" / "loose.png", rng.random((8, 8, 3)), 8)
    with pytest.raises(ConfigError, match="mixes images"):
        predict_in_process(tmp_path, f"ckpt={tmp_path / 'dual.pth'}", f"input={tmp_path / 'pairs'}")
    with pytest.raises(ConfigError, match="not a folder in DPDD's layout"):
        predict_in_process(tmp_path, f"ckpt={tmp_path / 'dual.pth'}", f"input={tmp_path / 'pairs' / 'loose.png'}")


def test_predict_feeds_a_prior_fused_swintormer_its_prior_read_or_sampled_as_generate_prior_does(tmp_path, parity_dir):
    from deblur_diffusion.data.io import read_image_raw, write_image
    from deblur_diffusion.errors import ConfigError
    from deblur_diffusion.generate_prior import generate_priors
    from deblur_diffusion.models import Swintormer

    torch.manual_seed(0)
    net = Swintormer(inp_channels=6, window_size=4, **TINY_UNET).eval()  # the photo, then its prior
    torch.save({"params": net.state_dict()}, tmp_path / "fused.pth")
    rng = np.random.default_rng(1)
    write_image(tmp_path / "photos" / "x.png", rng.random((32, 32, 3)), 8)
    ldm = parity_dir / "ldm_sr"
    prior_options = ["data.num_workers=0", "batch_size=1", "device=cpu"]  # the default seed, as predict
    generate_priors(
        compose_config(
            "generate_prior",
            tmp_path,
            f"ckpt={ldm / 'model.ckpt'}",
            f"ldm_config={ldm / 'config.yaml'}",
            f"input={tmp_path / 'photos'}",
            f"out={tmp_path / 'priors'}",
            "steps=2",
            *prior_options,
        )
    )
    common = [f"ckpt={tmp_path / 'fused.pth'}", f"input={tmp_path / 'photos'}", "architecture.window_size=4"]
    with pytest.raises(ConfigError, match="reads a photo and its diffusion prior, give prior.dir"):
        predict_in_process(tmp_path, *common, f"output={tmp_path / 'none'}")
    photo = read_image_raw(tmp_path / "photos" / "x.png") / 255.0
    prior = read_image_raw(tmp_path / "priors" / "x.png") / 65535.0
    fused = torch.from_numpy(np.concatenate([photo, prior], axis=2).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = (net(fused).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    sampled = [f"prior.ckpt={ldm / 'model.ckpt'}", f"prior.ldm_config={ldm / 'config.yaml'}", "prior.steps=2"]
    for how, options in (("read", [f"prior.dir={tmp_path / 'priors'}"]), ("sampled", sampled)):
        predict_in_process(tmp_path, *common, *options, f"output={tmp_path / how}")
        np.testing.assert_array_equal(read_image_raw(tmp_path / how / "x.png"), expected.astype(np.uint8), err_msg=how)
