"""Restoring a user's photos as they have them: views in the model's order, phone JPEGs with their
metadata, formats that cannot be read, weights from a URL, out-of-memory fallbacks and provenance."""

from __future__ import annotations

import http.server
import io
import json
import logging
import subprocess
import threading
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import compose_config, run_cli
from networks import TINY_UNET
from PIL import Image, ImageCms

from deblur_diffusion.data.io import read_image_raw, write_image
from deblur_diffusion.downloads import DownloadError, cached_path, fetch_weights, local_weights
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.inference import Inference
from deblur_diffusion.models import Restormer, Swintormer
from deblur_diffusion.predict import predict
from deblur_diffusion.restorer import Restorer


def predict_in_process(tmp_path, *overrides, output="out"):
    return predict(compose_config("predict", tmp_path, f"output={tmp_path / output}", "device=cpu", *overrides))


def dual_pixel_views(folder_of, names=("a",), seed=0):
    """Writes 16-bit left and right views; ``folder_of(view)`` is the folder of ``l`` or ``r``."""
    rng = np.random.default_rng(seed)
    for name in names:
        for view in "lr":
            write_image(folder_of(view) / f"{name}.png", rng.random((24, 32, 3)), 16)


def restored_in_order(net, folder_of, order, name="a"):
    """The network's restoration of the pair fed in ``order``, as the 16-bit file predict writes."""
    planes = [read_image_raw(folder_of(view) / f"{name}.png") / 65535.0 for view in order]
    batch = torch.from_numpy(np.concatenate(planes, axis=2).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        restored = net(batch).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.round(restored * 65535).astype(np.uint16)


def test_predict_feeds_the_released_swintormer_right_then_left_and_restormer_left_then_right(tmp_path):
    torch.manual_seed(0)
    swintormer = Swintormer(inp_channels=6, window_size=4, **TINY_UNET).eval()
    restormer = Restormer(**TINY_UNET, inp_channels=6, dual_pixel_task=True).eval()
    torch.save({"params": swintormer.state_dict()}, tmp_path / "swintormer.pth")
    torch.save({"params": restormer.state_dict()}, tmp_path / "restormer.pth")

    def relaid(view):
        return tmp_path / "pairs" / f"input{view.upper()}"

    dual_pixel_views(relaid)
    predict_in_process(tmp_path, f"ckpt={tmp_path / 'swintormer.pth'}", f"input={tmp_path / 'pairs'}", "architecture.window_size=4")
    np.testing.assert_array_equal(read_image_raw(tmp_path / "out" / "a.png"), restored_in_order(swintormer, relaid, "rl"))
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["views"] == ["r", "l"]
    predict_in_process(tmp_path, f"ckpt={tmp_path / 'restormer.pth'}", f"input={tmp_path / 'pairs'}", output="restormer")
    np.testing.assert_array_equal(read_image_raw(tmp_path / "restormer" / "a.png"), restored_in_order(restormer, relaid, "lr"))
    # An explicit order wins.
    predict_in_process(tmp_path, f"ckpt={tmp_path / 'restormer.pth'}", f"input={tmp_path / 'pairs'}", "views=[r,l]", output="given")
    np.testing.assert_array_equal(read_image_raw(tmp_path / "given" / "a.png"), restored_in_order(restormer, relaid, "rl"))


def test_predict_feeds_a_checkpoint_its_trained_view_order_from_dpdd_folders_as_distributed(tmp_path):
    torch.manual_seed(0)
    config = {"_target_": "deblur_diffusion.models.Restormer", **TINY_UNET, "inp_channels": 6, "dual_pixel_task": True}
    net = Restormer(**TINY_UNET, inp_channels=6, dual_pixel_task=True).eval()
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    trained = {"model": {"net": config}, "data": {"train": {"views": ["r", "l"]}}}
    torch.save({"state_dict": state, "deblur_diffusion_config": trained}, tmp_path / "rl.ckpt")

    def distributed(view):
        return tmp_path / "dd_dp_dataset_png" / f"test_{view}" / "source"

    dual_pixel_views(distributed)
    dual_pixel_views(lambda view: tmp_path / "dd_dp_dataset_png" / f"train_{view}" / "source", seed=1)
    common = [f"ckpt={tmp_path / 'rl.ckpt'}", f"input={tmp_path / 'dd_dp_dataset_png'}"]
    with pytest.raises(ConfigError, match=r"holds the DPDD splits \['test', 'train'\] side by side: choose one with split="):
        predict_in_process(tmp_path, *common)
    written, failures = predict_in_process(tmp_path, *common, "split=test")
    assert not failures and [path.name for path in written] == ["a.png"]
    np.testing.assert_array_equal(read_image_raw(tmp_path / "out" / "a.png"), restored_in_order(net, distributed, "rl"))


def _jpeg_segments(data: bytes) -> list[bytes]:
    """The markers of a JPEG's header segments, in file order, up to the start of scan."""
    markers, position = [], 2
    while data[position + 1] != 0xDA:
        markers.append(data[position : position + 2])
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return markers


def _phone_jpeg(path, size=(40, 24)):
    rng = np.random.default_rng(3)
    photo = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "PhoneMaker", "Phone 12", 6  # make, model, orientation
    exif.get_ifd(0x8769)[0x9003] = "2026:12:07 10:00:00"  # date taken
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 30.0)})  # GPS
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo.save(path, "JPEG", quality=90, exif=exif, icc_profile=profile)
    return profile


def test_a_phone_jpeg_keeps_its_exif_and_profile_upright_in_a_valid_segment_order(tmp_path):
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / "net_g.pth")
    (tmp_path / "in").mkdir()
    profile = _phone_jpeg(tmp_path / "in" / "phone.jpg")
    predict_in_process(tmp_path, f"ckpt={tmp_path / 'net_g.pth'}", f"input={tmp_path / 'in'}")
    data = (tmp_path / "out" / "phone.jpg").read_bytes()
    segments = _jpeg_segments(data)
    assert segments[:3] == [b"\xff\xe0", b"\xff\xe1", b"\xff\xe2"]  # JFIF APP0, then EXIF APP1, then ICC APP2
    with Image.open(io.BytesIO(data)) as restored:
        exif = restored.getexif()
        assert restored.size == (24, 40)  # upright
        assert (exif[0x010F], exif[0x0110], exif[0x0112]) == ("PhoneMaker", "Phone 12", 1)
        assert exif.get_ifd(0x8769)[0x9003] == "2026:12:07 10:00:00"
        assert exif.get_ifd(0x8825)[1] == "N" and exif.get_ifd(0x8825)[2] == (48.0, 51.0, 30.0)
        assert restored.info["icc_profile"] == profile
        # Written at quality 95: libjpeg's tables for 95, as Pillow writes them.
        reference = io.BytesIO()
        Image.new("RGB", (8, 8)).save(reference, "JPEG", quality=95)
        assert restored.quantization[0] == Image.open(reference).quantization[0]


def test_webp_and_tiff_photos_keep_their_profile_webp_its_exif_tiff_its_16_bits(tmp_path):
    import tifffile

    torch.manual_seed(0)
    net = Restormer(**TINY_UNET).eval()
    torch.save({"params": net.state_dict()}, tmp_path / "net_g.pth")
    (tmp_path / "in").mkdir()
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(5)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "PhoneMaker", "Phone 12"
    shared = (rng.random((24, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(shared).save(tmp_path / "in" / "shared.webp", "WEBP", lossless=True, exif=exif, icc_profile=profile)
    scan = (rng.random((24, 40, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in" / "scan.tif", scan, photometric="rgb", iccprofile=profile)
    predict_in_process(tmp_path, f"ckpt={tmp_path / 'net_g.pth'}", f"input={tmp_path / 'in'}")
    with Image.open(tmp_path / "out" / "shared.webp") as restored:
        assert restored.info["icc_profile"] == profile
        assert (restored.getexif()[0x010F], restored.getexif()[0x0110]) == ("PhoneMaker", "Phone 12")
        # Lossless: the network's restoration rounded to 8 bits, read back by Pillow.
        np.testing.assert_array_equal(np.asarray(restored.convert("RGB")), restored_by(net, shared, 8))
    with tifffile.TiffFile(tmp_path / "out" / "scan.tif") as restored:
        page = restored.pages[0]
        assert page.tags["InterColorProfile"].value == profile
        np.testing.assert_array_equal(page.asarray(), restored_by(net, scan, 16))


def restored_by(net, pixels: np.ndarray, bits: int) -> np.ndarray:
    """The network's restoration of an RGB image of ``bits`` bits, at that depth."""
    scale = 2**bits - 1
    batch = torch.from_numpy((pixels / scale).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        restored = net(batch).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.round(restored * scale).astype(pixels.dtype)


def test_a_mixed_folder_restores_what_it_can_and_names_every_file_it_cannot(tmp_path):
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / "net_g.pth")
    folder = tmp_path / "in"
    folder.mkdir()
    _phone_jpeg(folder / "phone.jpg")
    write_image(folder / "deep.png", np.random.default_rng(0).random((20, 28, 3)), 16)
    (folder / "iphone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (folder / "raw.dng").write_bytes(b"II*\x00" + bytes(64))
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "README.txt").write_text("my photos")
    result = run_cli(
        "predict", f"ckpt={tmp_path / 'net_g.pth'}", f"input={folder}", f"output={tmp_path / 'out'}", "device=cpu", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Restored 2 of 5 images" in result.stdout
    for name, reason in (
        ("iphone.heic", "HEIC is not supported: convert it to JPEG or PNG first"),
        ("raw.dng", "a camera RAW file (DNG) is not supported: develop it to a 16-bit PNG or TIFF first"),
        ("notes.jpg", "cannot decode image"),
    ):
        assert f"failed: {folder / name}: {reason}" in result.stdout, result.stdout
    assert "README" not in result.stdout
    assert read_image_raw(tmp_path / "out" / "deep.png").dtype == np.uint16
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deep.png", "phone.jpg", "predict.json"]
    assert sorted(json.loads((tmp_path / "out" / "predict.json").read_text())["failed"]) == sorted(
        str(folder / name) for name in ("iphone.heic", "raw.dng", "notes.jpg")
    )


def test_the_two_misleading_answers_are_now_one_clear_line_each(tmp_path):
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / "net_g.pth")
    with pytest.raises(ConfigError, match=r"^input .*nowhere does not exist$"):
        predict_in_process(tmp_path, f"ckpt={tmp_path / 'net_g.pth'}", f"input={tmp_path / 'nowhere'}")
    config = {"_target_": "deblur_diffusion.models.Restormer", **TINY_UNET}
    state = {f"net.{key}": value for key, value in Restormer(**TINY_UNET).state_dict().items()}
    torch.save({"state_dict": state, "deblur_diffusion_config": {"model": {"net": config}}}, tmp_path / "restormer.ckpt")
    write_image(tmp_path / "in" / "x.png", np.zeros((16, 16, 3)), 8)
    with pytest.raises(Exception, match=r"names a Swintormer, but .*restormer\.ckpt holds a Restormer"):
        predict_in_process(tmp_path, f"ckpt={tmp_path / 'restormer.ckpt'}", f"input={tmp_path / 'in'}", "model=swintormer")


class _Release(http.server.BaseHTTPRequestHandler):
    """Serves one file with range requests; the first ``cut_after`` bytes of a full response and
    then the connection drops (a cut download)."""

    body = b""
    cut_after: int | None = None
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self):
        requested = self.headers.get("Range")
        type(self).ranges.append(requested)
        start = int(requested.split("=")[1].rstrip("-")) if requested else 0
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(self.body) - start))
        self.end_headers()
        part = self.body[start:]
        if type(self).cut_after is not None and not requested:
            part = part[: type(self).cut_after]
        self.wfile.write(part)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(tmp_path / "cache"))
    buffer = io.BytesIO()
    torch.manual_seed(0)
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, buffer)
    handler = type("Release", (_Release,), {"body": buffer.getvalue(), "cut_after": len(buffer.getvalue()) // 2, "ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/releases/net_g.pth", handler
    server.shutdown()


def test_weights_from_a_url_download_once_resume_after_a_cut_and_check_their_sha256(tmp_path, release_server):
    import hashlib

    url, served = release_server
    digest = hashlib.sha256(served.body).hexdigest()
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch_weights(url)
    partial = cached_path(url).with_name("net_g.pth.partial")
    assert partial.stat().st_size == len(served.body) // 2
    assert fetch_weights(url, sha256=digest).read_bytes() == served.body
    assert served.ranges == [None, f"bytes={len(served.body) // 2}-"]  # the rest only
    with pytest.raises(DownloadError, match=f"has SHA-256 {digest}, not the expected 00ff"):
        fetch_weights(url, sha256="00ff")
    write_image(tmp_path / "in" / "x.png", np.random.default_rng(0).random((16, 16, 3)), 8)
    predict_in_process(tmp_path, f"ckpt={url}", f"input={tmp_path / 'in'}", f"ckpt_sha256={digest}")
    assert served.ranges[2:] == []  # cached: not downloaded again
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["sha256"] == digest


def test_one_digest_for_weights_in_several_files_is_refused_not_ignored(tmp_path):
    parts = {"transformer": str(tmp_path / "net_g.pth"), "denoiser": str(tmp_path / "net_d.pth")}
    with pytest.raises(DownloadError, match=r"ckpt_sha256= checks one file, but ckpt= names 2 \(transformer, denoiser\)"):
        local_weights(parts, sha256="00ff")


def test_the_digest_predict_records_for_an_export_folder_is_accepted_back(tmp_path):
    from deblur_diffusion.export import export

    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / "net_g.pth")
    folder = export(str(tmp_path / "net_g.pth"), tmp_path / "exported")
    write_image(tmp_path / "in" / "x.png", np.random.default_rng(0).random((16, 16, 3)), 8)
    predict_in_process(tmp_path, f"ckpt={folder}", f"input={tmp_path / 'in'}")
    digest = json.loads((tmp_path / "out" / "predict.json").read_text())["sha256"]
    predict_in_process(tmp_path, f"ckpt={folder}", f"input={tmp_path / 'in'}", f"ckpt_sha256={digest}", output="again")
    with pytest.raises(DownloadError, match="not the expected 00ff"):
        predict_in_process(tmp_path, f"ckpt={folder}", f"input={tmp_path / 'in'}", "ckpt_sha256=00ff", output="refused")


def test_a_url_without_a_network_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/net_g.pth"  # the discard port: nothing listens
    with pytest.raises(DownloadError, match=rf"cannot download {url} .*put it at {tmp_path / 'cache'}/[0-9a-f]{{12}}/net_g\.pth"):
        fetch_weights(url)


class _CudnnAllocationFails(torch.nn.Module):
    """Fails as cuDNN reports an allocation failure (a RuntimeError) on inputs over ``limit`` pixels."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit, self.calls = net, limit, []
        self.input_channels, self.needs_sharp_input = 3, False

    def forward(self, x):
        self.calls.append(x.shape[-2] * x.shape[-1])
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED (simulated)")
        return self.net(x)


def test_a_cudnn_allocation_failure_falls_back_to_tiles_kept_for_the_next_images(caplog):
    torch.manual_seed(0)
    net = Restormer(**TINY_UNET).eval()
    failing = _CudnnAllocationFails(net, 64 * 64)
    restorer = Restorer(failing, Inference("whole", tile_size=64, stride=56), device="cpu")
    images = [torch.rand(3, 80, 72), torch.rand(3, 90, 70)]
    with caplog.at_level(logging.WARNING, logger="deblur_diffusion"):
        first = restorer.restore(images[0])
        calls_before_second = len(failing.calls)
        second = restorer.restore(images[1])
    tiles = Inference("tiles", tile_size=64, stride=56)
    torch.testing.assert_close(first, tiles(net, images[0][None]).clamp(0, 1)[0], rtol=0, atol=0)
    torch.testing.assert_close(second, tiles(net, images[1][None]).clamp(0, 1)[0], rtol=0, atol=0)
    assert len(caplog.records) == 1  # one fallback, for the first image only
    assert max(failing.calls[calls_before_second:]) <= 64 * 64  # the second went straight to the tiles
    with pytest.raises(RuntimeError, match="an unrelated failure"):
        Restorer(_Raises(), device="cpu").restore(torch.rand(3, 8, 8))


class _Raises(torch.nn.Module):
    input_channels, needs_sharp_input = 3, False

    def forward(self, x):
        raise RuntimeError("an unrelated failure")


def test_provenance_is_unknown_for_a_package_inside_another_repository(tmp_path):
    from deblur_diffusion.provenance import PACKAGE_DIR, git_commit

    foreign = tmp_path / "my_project"
    package = foreign / ".venv" / "lib" / "python3.11" / "site-packages" / "deblur_diffusion"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@e"]
    subprocess.run([*git, "init", "-q", str(foreign)], check=True)
    subprocess.run([*git, "-C", str(foreign), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(foreign), "commit", "-qm", "mine"], check=True)
    assert git_commit(package) == "unknown"
    # The same layout as this checkout (src/deblur_diffusion, the project's pyproject.toml) in
    # another repository's subfolder is not the project's checkout either.
    (foreign / "vendor" / "src" / "deblur_diffusion").mkdir(parents=True)
    (foreign / "vendor" / "pyproject.toml").write_text('[project]\nname = "deblur-diffusion"\n')
    assert git_commit(foreign / "vendor" / "src" / "deblur_diffusion") == "unknown"
    commit = git_commit(PACKAGE_DIR)
    assert commit == "unknown" or len(commit.removesuffix("+dirty")) == 40  # this checkout, or an installed wheel


def test_a_prior_for_a_photo_taken_on_its_side_lines_up_and_equals_the_one_predict_samples(tmp_path, parity_dir, serve_folder):
    from deblur_diffusion.generate_prior import generate_priors

    torch.manual_seed(0)
    net = Swintormer(inp_channels=6, window_size=4, **TINY_UNET).eval()  # the photo, then its prior
    torch.save({"params": net.state_dict()}, tmp_path / "fused.pth")
    photo = Image.fromarray((np.random.default_rng(2).random((32, 48, 3)) * 255).astype(np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored on its side
    (tmp_path / "photos").mkdir()
    photo.save(tmp_path / "photos" / "side.png", exif=exif)
    ldm = parity_dir / "ldm_sr"
    released = [f"ckpt={ldm / 'model.ckpt'}", f"ldm_config={ldm / 'config.yaml'}", "steps=2"]
    generate_priors(
        compose_config(
            "generate_prior",
            tmp_path,
            *released,
            f"input={tmp_path / 'photos'}",
            f"out={tmp_path / 'priors'}",
            "data.num_workers=0",
            "device=cpu",
        )
    )
    assert read_image_raw(tmp_path / "priors" / "side.png").shape == (48, 32, 3)  # upright, as predict reads the photo
    common = [f"ckpt={tmp_path / 'fused.pth'}", f"input={tmp_path / 'photos'}", "architecture.window_size=4"]
    written, failures = predict_in_process(tmp_path, *common, f"prior.dir={tmp_path / 'priors'}", output="read")
    assert not failures and len(written) == 1
    # The released files by address, as published.
    base = serve_folder(ldm)
    sampled = [f"prior.ckpt={base}/model.ckpt", f"prior.ldm_config={base}/config.yaml", "prior.steps=2"]
    predict_in_process(tmp_path, *common, *sampled, output="sampled")  # both with their default seeds
    np.testing.assert_array_equal(read_image_raw(tmp_path / "read" / "side.png"), read_image_raw(tmp_path / "sampled" / "side.png"))
