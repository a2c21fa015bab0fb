"""Each evaluation protocol against the official evaluation code's computation, redone in the test
with scikit-image / OpenCV / SciPy called with the official scripts' exact arguments, on real
photographs written in each dataset's layout."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra import compose, initialize_config_dir
from scipy import ndimage
from skimage import data as skdata
from skimage import img_as_ubyte, io
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblur_diffusion.cli import config_dir
from deblur_diffusion.compare import main as compare_main
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.evaluate import evaluate
from deblur_diffusion.metrics import matlab_psnr, matlab_ssim
from deblur_diffusion.models import Restormer, Swintormer

TINY_RESTORMER = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])
TINY_RESTORMER_OVERRIDES = [f"model.net.{k}={v}".replace(" ", "") for k, v in TINY_RESTORMER.items()]
TINY_SWINTORMER = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], window_size=4)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
SIZE = (48, 64)


def photographs(count=None):
    """Crops of scikit-image's colour photographs (all of them by default), H x W x 3 uint8."""
    count = len(PHOTOS) if count is None else count
    crops = []
    for name in PHOTOS[:count]:
        image = getattr(skdata, name)()
        top, left = image.shape[0] // 3, image.shape[1] // 3
        crops.append(np.ascontiguousarray(image[top : top + SIZE[0], left : left + SIZE[1]]))
    return crops


def blurred(image):
    return cv2.GaussianBlur(image, (5, 5), 1.2)


def to_16bit(image, rng):
    """A 16-bit image whose low byte carries detail: rounding and truncation to 8 bits differ."""
    return (image.astype(np.uint16) * 256 + rng.integers(0, 256, image.shape, dtype=np.uint16)).astype(np.uint16)


def write_rgb(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))


def official_file(tmp_path, net):
    torch.manual_seed(0)
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    path = tmp_path / "net_g.pth"
    torch.save({"params": net.state_dict()}, path)
    return net.eval(), path


def run_evaluate(tmp_path, *overrides):
    cfg = compose_config(
        "evaluate",
        tmp_path,
        *overrides,
        f"paths.data_dir={tmp_path}",
        f"output_dir={tmp_path}/eval",
        "lpips=false",
        "data.num_workers=0",
        output_dir=tmp_path / "eval",
    )
    summary = evaluate(cfg)
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = {row["name"]: {k: v if k in ("name", "group") else float(v) for k, v in row.items()} for row in csv.DictReader(handle)}
    return summary, rows


def restore(net, image):
    """The official test scripts' forward pass: float32 H x W x C in [0, 1] -> clamped float32 output."""
    with torch.no_grad():
        out = net(torch.from_numpy(image).permute(2, 0, 1)[None]).clamp(0, 1)
    return out[0].permute(1, 2, 0).numpy()


def assert_scores(row, psnr, ssim, prefix=""):
    assert row[prefix + "psnr"] == pytest.approx(psnr, abs=1e-6)
    assert row[prefix + "ssim"] == pytest.approx(ssim, abs=1e-5)


def dpdd_reference(gt, restored):
    """Restormer's Defocus_Deblurring/utils.py: PSNR(imgC, restored), SSIM, MAE on float32 arrays."""
    return (
        peak_signal_noise_ratio(gt, restored, data_range=1),
        structural_similarity(gt, restored, data_range=1, channel_axis=-1),
        np.mean([np.mean(np.abs(gt[:, :, c] - restored[:, :, c])) for c in range(3)]),
    )


def test_dpdd_single_reads_8_bit_as_cv2_imread_and_scores_like_utils_py(tmp_path, rng):
    net, path = official_file(tmp_path, Restormer(**TINY_RESTORMER))
    for index, photo in enumerate(photographs()):
        write_rgb(tmp_path / "DPDD" / "test_c" / "target" / f"{index:02d}.png", to_16bit(photo, rng))
        write_rgb(tmp_path / "DPDD" / "test_c" / "source" / f"{index:02d}.png", to_16bit(blurred(photo), rng))
    summary, rows = run_evaluate(tmp_path, f"ckpt={path}", "model=restormer", *TINY_RESTORMER_OVERRIDES, "data=dpdd")
    assert set(summary) == {"all"}  # indoor/outdoor rows need the 76 test scenes
    for index in range(len(PHOTOS)):
        # test_single_image_defocus_deblur.py: np.float32(load_img(file)) / 255. with cv2.imread(file).
        lq, gt = (
            np.float32(cv2.cvtColor(cv2.imread(str(tmp_path / "DPDD" / "test_c" / folder / f"{index:02d}.png")), cv2.COLOR_BGR2RGB)) / 255.0
            for folder in ("source", "target")
        )
        psnr, ssim, mae = dpdd_reference(gt, restore(net, lq))
        assert_scores(rows[f"{index:02d}"], psnr, ssim)
        assert rows[f"{index:02d}"]["mae"] == pytest.approx(mae, abs=1e-6)
        assert_scores(rows[f"{index:02d}"], *dpdd_reference(gt, lq)[:2], prefix="input_")
        # The fixture tells the readings apart: the 16-bit reading scores differently.
        sixteen = np.float32(cv2.imread(str(tmp_path / "DPDD" / "test_c" / "target" / f"{index:02d}.png"), -1)[:, :, ::-1]) / 65535.0
        assert abs(peak_signal_noise_ratio(sixteen, restore(net, lq), data_range=1) - psnr) > 1e-3


def test_dpdd_dual_on_the_relaid_folders_reads_16_bit(tmp_path, rng):
    net, path = official_file(tmp_path, Restormer(inp_channels=6, dual_pixel_task=True, **TINY_RESTORMER))
    folder = tmp_path / "DPDD" / "test"
    for index, photo in enumerate(photographs(3)):
        write_rgb(folder / "target" / f"{index}.png", to_16bit(photo, rng))
        for view in "CLR":
            write_rgb(folder / f"input{view}" / f"{index}.png", to_16bit(blurred(photo), rng))
    _summary, rows = run_evaluate(tmp_path, f"ckpt={path}", "model=restormer", *TINY_RESTORMER_OVERRIDES, "data=dpdd_dual")
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["protocol"] == "dpdd_dual"
    for index in range(3):
        # test_dual_pixel_defocus_deblur.py: load_img16 = cv2.imread(file, -1), / 65535., input [L, R].
        left, right, gt = (
            np.float32(cv2.cvtColor(cv2.imread(str(folder / name / f"{index}.png"), -1), cv2.COLOR_BGR2RGB)) / 65535.0
            for name in ("inputL", "inputR", "target")
        )
        psnr, ssim, _ = dpdd_reference(gt, restore(net, np.concatenate([left, right], axis=2)))
        assert_scores(rows[str(index)], psnr, ssim)


def matlab_ssim_reference(restored, target):
    """MATLAB's documented ssim for a 3-D uint8 array, from SciPy's Gaussian filter: sigma 1.5 on
    all three axes, radius 5 (filter size 2*ceil(3*sigma)+1), replicated borders."""
    x, y = restored.astype(np.float64), target.astype(np.float64)

    def blur(v):
        return ndimage.gaussian_filter(v, sigma=1.5, mode="nearest", truncate=5 / 1.5)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return np.mean(((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))


def test_gopro_is_scored_as_evaluate_gopro_hide_m_on_the_saved_uint8_images(tmp_path):
    net, path = official_file(tmp_path, Restormer(**TINY_RESTORMER))
    for index, photo in enumerate(photographs(3)):
        write_rgb(tmp_path / "GoPro" / "test" / "target" / f"{index}.png", photo)
        write_rgb(tmp_path / "GoPro" / "test" / "input" / f"{index}.png", blurred(photo))
    _summary, rows = run_evaluate(tmp_path, f"ckpt={path}", "model=restormer", *TINY_RESTORMER_OVERRIDES, "data=gopro")
    assert list(rows["0"]) == ["name", "group", "psnr", "ssim", "input_psnr", "input_ssim"]
    for index in range(3):
        # Motion_Deblurring/test.py saves img_as_ubyte(restored); the .m file reads it and the target with imread.
        gt = cv2.imread(str(tmp_path / "GoPro" / "test" / "target" / f"{index}.png"))[:, :, ::-1]
        lq = np.float32(cv2.imread(str(tmp_path / "GoPro" / "test" / "input" / f"{index}.png"))[:, :, ::-1]) / 255.0
        saved = img_as_ubyte(restore(net, lq))
        assert_scores(rows[str(index)], peak_signal_noise_ratio(gt, saved), matlab_ssim_reference(saved, gt))


# Computed once with GNU Octave 7.3 (octave-image 2.14, which has no ssim): the documented 3-D ssim
# built from padarray(..., 'replicate') and convn(..., 'valid') with the 11 x 11 x 11 Gaussian of
# sigma 1.5 in double precision, and Octave's own psnr; images made as in octave_pair().
OCTAVE_SSIM_3D = 0.94854500337619529
OCTAVE_SSIM_PER_CHANNEL = (0.90758933001338371, 0.89137385405031233, 0.86519658763920582)
OCTAVE_PSNR = 28.892799836292088


def octave_pair():
    sharp = skdata.astronaut()[100:164, 150:230]
    blurry = np.clip(np.rint(ndimage.gaussian_filter(sharp.astype(np.float64), sigma=(1.2, 1.2, 0))), 0, 255).astype(np.uint8)
    return blurry, sharp


def test_matlab_ssim_is_a_3d_window_not_per_channel():
    blurry, sharp = octave_pair()
    assert matlab_ssim(blurry, sharp) == pytest.approx(OCTAVE_SSIM_3D, abs=1e-12)
    assert matlab_ssim(blurry, sharp) == pytest.approx(matlab_ssim_reference(blurry, sharp), abs=1e-12)
    assert matlab_psnr(blurry, sharp) == pytest.approx(OCTAVE_PSNR, abs=1e-12)
    per_channel = [matlab_ssim_reference(blurry[:, :, [c]], sharp[:, :, [c]]) for c in range(3)]
    np.testing.assert_allclose(per_channel, OCTAVE_SSIM_PER_CHANNEL, atol=1e-12)
    assert abs(matlab_ssim(blurry, sharp) - np.mean(per_channel)) > 1e-2


def realblur_reference(saved_file, target_file):
    """HI-Diff's evaluate_realblur.py on one pair of files."""
    tar = io.imread(target_file).astype(np.float32) / 255.0
    prd = io.imread(saved_file).astype(np.float32) / 255.0
    zs = (np.sum(tar * prd) / np.sum(prd * prd)) * prd
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 0)
    _, warp = cv2.findTransformECC(
        cv2.cvtColor(tar, cv2.COLOR_RGB2GRAY),
        cv2.cvtColor(zs, cv2.COLOR_RGB2GRAY),
        np.eye(3, 3, dtype=np.float32),
        cv2.MOTION_HOMOGRAPHY,
        criteria,
        inputMask=None,
        gaussFiltSize=5,
    )
    shape = (tar.shape[1], tar.shape[0])
    zr = cv2.warpPerspective(zs, warp, shape, flags=cv2.INTER_CUBIC + cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
    cr = cv2.warpPerspective(
        np.ones_like(zs, dtype="float32"),
        warp,
        shape,
        flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    prd, tar = zr * cr, tar * cr
    psnr = 10 * np.log10(1 / (np.sum((tar - prd) ** 2, dtype=np.float64) / np.sum(cr)))
    _, ssim_map = structural_similarity(
        tar, prd, channel_axis=2, gaussian_weights=True, use_sample_covariance=False, data_range=1.0, full=True
    )
    ssim = ((ssim_map * cr)[5:-5, 5:-5].sum(axis=(0, 1)) / cr[5:-5, 5:-5].sum(axis=(0, 1))).mean()
    return psnr, ssim


def test_realblur_relaid_test_folder_is_scored_like_evaluate_realblur_py(tmp_path):
    _net, path = official_file(tmp_path, Restormer(**TINY_RESTORMER))
    folder = tmp_path / "RealBlur" / "test" / "RealBlur_J"
    for index, photo in enumerate(photographs(2)):
        write_rgb(folder / "target" / f"scene{index}.png", photo)
        write_rgb(folder / "input" / f"scene{index}.png", blurred(np.roll(photo, 1, axis=1)))
    _summary, rows = run_evaluate(
        tmp_path, f"ckpt={path}", "model=restormer", *TINY_RESTORMER_OVERRIDES, "data=realblur_j", "save_images=true"
    )
    for index in range(2):
        assert_scores(
            rows[f"scene{index}"],
            *realblur_reference(tmp_path / "eval" / "images" / f"scene{index}.png", folder / "target" / f"scene{index}.png"),
        )
        assert_scores(
            rows[f"scene{index}"],
            *realblur_reference(folder / "input" / f"scene{index}.png", folder / "target" / f"scene{index}.png"),
            prefix="input_",
        )


def test_a_protocol_that_reads_otherwise_than_the_data_is_refused(tmp_path, rng):
    _, path = official_file(tmp_path, Restormer(**TINY_RESTORMER))
    photo = photographs(1)[0]
    write_rgb(tmp_path / "DPDD" / "test_c" / "target" / "0.png", to_16bit(photo, rng))
    write_rgb(tmp_path / "DPDD" / "test_c" / "source" / "0.png", to_16bit(photo, rng))
    with pytest.raises(ConfigError, match=r"dpdd_dual reads the images at their stored depth .* data.test.read_8bit=false"):
        run_evaluate(tmp_path, f"ckpt={path}", "model=restormer", *TINY_RESTORMER_OVERRIDES, "data=dpdd", "protocol=dpdd_dual")


@pytest.mark.parametrize("data, channels", [("gopro", 6), ("dpdd_dual", 9)])
def test_a_prior_fused_swintormer_is_evaluated_through_the_datamodule(tmp_path, rng, data, channels):
    net, path = official_file(tmp_path, Swintormer(inp_channels=channels, **TINY_SWINTORMER))
    photos = photographs(2)
    for index, photo in enumerate(photos):
        if data == "gopro":
            write_rgb(tmp_path / "GoPro" / "test" / "target" / f"{index}.png", photo)
            write_rgb(tmp_path / "GoPro" / "test" / "input" / f"{index}.png", blurred(photo))
        else:
            write_rgb(tmp_path / "DPDD" / "test_c" / "target" / f"{index}.png", to_16bit(photo, rng))
            for view in "clr":
                write_rgb(tmp_path / "DPDD" / f"test_{view}" / "source" / f"{index}.png", to_16bit(blurred(photo), rng))
        prior = to_16bit(255 - photo, rng)
        write_rgb(tmp_path / "priors" / "test" / f"{index}.png", prior)
    overrides = [f"model.net.{k}={v}".replace(" ", "") for k, v in TINY_SWINTORMER.items()]
    summary, rows = run_evaluate(
        tmp_path, f"ckpt={path}", "model=swintormer", *overrides, f"data={data}", f"data.prior_dir={tmp_path}/priors"
    )
    assert summary["all"]["images"] == 2
    # What the network saw: the views then the prior, as training reads them.
    read = (
        (lambda f: np.float32(cv2.imread(str(f))[:, :, ::-1]) / 255.0)
        if data == "gopro"
        else (lambda f: np.float32(cv2.imread(str(f), -1)[:, :, ::-1]) / 65535.0)
    )
    for index in range(2):
        views = (
            [tmp_path / "GoPro" / "test" / "input" / f"{index}.png"]
            if data == "gopro"
            else [tmp_path / "DPDD" / f"test_{v}" / "source" / f"{index}.png" for v in "lr"]
        )
        lq = np.concatenate(
            [read(f) for f in views]
            + [np.float32(cv2.imread(str(tmp_path / "priors" / "test" / f"{index}.png"), -1)[:, :, ::-1]) / 65535.0],
            axis=2,
        )
        expected = restore(net, lq)
        target = read(tmp_path / ("GoPro/test/target" if data == "gopro" else "DPDD/test_c/target") / f"{index}.png")
        if data == "gopro":
            saved = img_as_ubyte(expected)
            assert rows[str(index)]["psnr"] == pytest.approx(peak_signal_noise_ratio(np.uint8(np.rint(target * 255)), saved), abs=1e-6)
        else:
            assert rows[str(index)]["psnr"] == pytest.approx(peak_signal_noise_ratio(target, expected, data_range=1), abs=1e-6)


def test_compare_lists_better_and_worse_images(tmp_path, capsys):
    for run, values in (("a", (30.0, 25.0, 20.0)), ("b", (31.0, 24.0, 20.0))):
        (tmp_path / run).mkdir()
        rows = "\n".join(f"img{i},all,{v},0.9" for i, v in enumerate(values))
        (tmp_path / run / "per_image.csv").write_text("name,group,psnr,ssim\n" + rows + "\n")
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    psnr_cells = next(line for line in out.splitlines() if line.strip("│ ").startswith("psnr")).split("│")
    assert [cell.strip() for cell in psnr_cells[4:8]] == ["+0.0000", "1", "1", "1"]  # mean change, better, worse, same
    assert "img0" in out and "+1.00" in out and "img1" in out and "-1.00" in out
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 1


def official_grid_starts(length, size, stride=220):
    """Swintormer's basicsr/test.py ``grid``: starts every ``stride``, the last one snapped to the border."""
    step = length if length < size else stride
    starts, i, last = [], 0, False
    while i < length and not last:
        if i + size >= length:
            i, last = length - size, True
        starts.append(i)
        i += step
    return starts


@pytest.mark.parametrize("preset, tile", [("swintormer_release", 256), ("swintormer_paper", 512)])
def test_swintormer_tile_presets_place_tiles_as_the_official_grid(preset, tile):
    from hydra.utils import instantiate

    from deblur_diffusion.inference.tiles import tile_starts

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"inference={preset}", "ckpt=x"])
    inference = instantiate(cfg.inference)
    assert (inference.mode, inference.tile_size, inference.stride) == ("tiles", tile, 220)
    for length in (1120, 1680, 700):
        assert tile_starts(length, inference.tile_size, inference.stride) == official_grid_starts(length, tile)


def test_compare_refuses_evaluations_scored_with_different_protocols(tmp_path, capsys):
    for run, protocol in (("a", "gopro_matlab"), ("b", "standard")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "per_image.csv").write_text("name,group,psnr,ssim\nimg0,all,30.0,0.9\n")
        (tmp_path / run / "summary.json").write_text(json.dumps({"protocol": protocol, "split": "test"}))
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "gopro_matlab" in capsys.readouterr().err


def test_the_matlab_protocol_refuses_an_image_outside_the_unit_range():
    from deblur_diffusion.protocols import get_protocol

    image = torch.full((1, 3, 16, 16), 0.5)
    protocol = get_protocol("gopro_matlab")
    with pytest.raises(ValueError, match=r"in \[0, 1\]; got values in \[0.5, 1.2\]"):
        protocol.score(torch.cat([image[:, :, :8], image[:, :, 8:] + 0.7], dim=2), image, None)
