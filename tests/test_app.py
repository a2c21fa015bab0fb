"""The web app: its ``/restore`` endpoint through ``gradio_client`` gives what ``predict`` writes, a
file it cannot restore is an error while the server stays up, and a photo uploaded in a real browser
page comes back restored (a screenshot goes to ``build/screenshots/app.png``)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, compose_config
from networks import TINY_UNET
from PIL import Image

from deblur_diffusion.app import KEPT_JOBS
from deblur_diffusion.data.io import read_image_raw
from deblur_diffusion.models import Restormer
from deblur_diffusion.predict import predict

gradio = pytest.importorskip("gradio")
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on 127.0.0.1 with a release-format Restormer, and a photo to restore."""
    from deblur_diffusion.app import build_app

    folder = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, folder / "net_g.pth")
    photo = folder / "photos" / "street.jpg"
    photo.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(photo, quality=90, exif=exif)
    cfg = compose_config("app", folder, f"ckpt={folder / 'net_g.pth'}", "device=cpu")
    app = build_app(cfg, work=folder / "work")
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    # What predict writes with the same weights and options: the reference for the app's file.
    predict(
        compose_config(
            "predict", folder, f"ckpt={folder / 'net_g.pth'}", f"input={photo.parent}", f"output={folder / 'predicted'}", "device=cpu"
        )
    )
    yield f"http://127.0.0.1:{port}/", folder, photo
    app.close()


def test_the_restore_endpoint_returns_what_predict_writes_and_survives_a_bad_file(served):
    from gradio_client import Client, handle_file

    url, folder, photo = served
    client = Client(url, verbose=False)
    restored, _ = client.predict(handle_file(str(photo)), "net_g.pth", "fp32", 256, "cpu", api_name="/restore")
    assert Path(restored).name == "street.jpg"
    assert Path(restored).read_bytes() == (folder / "predicted" / "street.jpg").read_bytes()  # pixels, EXIF, quality alike
    broken = folder / "broken.png"
    broken.write_text("not a picture")
    with pytest.raises(Exception, match="cannot decode image"):
        client.predict(handle_file(str(broken)), "net_g.pth", "fp32", 256, "cpu", api_name="/restore")
    # Still up; the file alone takes the page's defaults.
    again, _ = client.predict(handle_file(str(photo)), api_name="/restore")
    np.testing.assert_array_equal(read_image_raw(again), read_image_raw(folder / "predicted" / "street.jpg"))
    # Trying other options keeps one network loaded and the results of the last few jobs only.
    for tile_size in (128, 160, 192, 224):
        client.predict(handle_file(str(photo)), "net_g.pth", "fp32", tile_size, "cpu", api_name="/restore")
    assert len(list((folder / "work" / "jobs").iterdir())) == KEPT_JOBS


def test_several_photos_come_back_as_a_zip_of_what_predict_writes(served):
    import zipfile

    from gradio_client import Client, handle_file

    url, folder, photo = served
    second = folder / "photos_two" / "other.png"
    second.parent.mkdir(exist_ok=True)
    Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)).save(second)
    predict(
        compose_config(
            "predict", folder, f"ckpt={folder / 'net_g.pth'}", f"input={second.parent}", f"output={folder / 'predicted'}", "device=cpu"
        )
    )
    client = Client(url, verbose=False)
    files = [handle_file(str(photo)), handle_file(str(second))]
    archive, _, status = client.predict(files, None, "net_g.pth", "fp32", 256, "cpu", api_name="/restore_photos")
    assert status.startswith("restored 2 of 2 on cpu")
    with zipfile.ZipFile(archive) as restored:
        assert sorted(restored.namelist()) == ["other.png", "street.jpg"]
        for name in restored.namelist():
            assert restored.read(name) == (folder / "predicted" / name).read_bytes()


def test_the_models_offered_are_the_file_given_or_the_names_of_a_mapping(tmp_path):
    from deblur_diffusion.app import _models

    cfg = compose_config("app", tmp_path, "ckpt=/weights/motion_deblurring.pth")
    assert _models(cfg) == {"motion_deblurring.pth": "/weights/motion_deblurring.pth"}
    cfg = compose_config("app", tmp_path, "ckpt={restormer: /w/a.pth, mine: /w/last.ckpt}")
    assert _models(cfg) == {"restormer": "/w/a.pth", "mine": "/w/last.ckpt"}
    # One HI-Diff model in three files is one choice, not three.
    cfg = compose_config("app", tmp_path, "ckpt={transformer: /w/net_g.pth, condition_encoder: /w/net_le_dm.pth, denoiser: /w/net_d.pth}")
    assert list(_models(cfg)) == ["HI-Diff"]


def test_a_photo_uploaded_in_the_browser_comes_back_restored(served, browser):
    url, folder, photo = served
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.locator("input[type=file]").first.set_input_files(str(photo))
    page.get_by_role("button", name="Restore").click()
    # The status box is a textarea: its value, not its text, says it is done.
    page.wait_for_function("[...document.querySelectorAll('textarea')].some(t => t.value.startsWith('restored 1 of 1'))", timeout=60_000)
    link = page.locator("a[download]").last  # the restored file's (the upload above has its own)
    link.wait_for(timeout=30_000)
    href = link.get_attribute("href")
    downloaded = urllib.request.urlopen(href if href.startswith("http") else url.rstrip("/") + href).read()
    assert downloaded == (folder / "predicted" / "street.jpg").read_bytes()
    assert page.locator("img").count() >= 2  # the slider's before and after
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app.png"))
    assert not errors, errors


def test_the_progress_follows_every_photo_and_its_tiles(tmp_path):
    from deblur_diffusion.app import Restorers, restore_files

    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / "net_g.pth")
    for name in ("a", "b"):
        Image.fromarray(np.zeros((100, 150, 3), np.uint8)).save(tmp_path / f"{name}.png")
    # Photos above max_pixels go on tiles: 64 px every 48 px over 100 x 150 are 2 x 3 tiles, 4 per call.
    cfg = compose_config("app", tmp_path, f"ckpt={tmp_path / 'net_g.pth'}", "device=cpu", "max_pixels=1000")
    cfg.inference.tile_size, cfg.inference.stride, cfg.inference.tile_batch_size = 64, 48, 4
    reported = []
    files = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    restorers = Restorers(cfg)
    written, _ = restore_files(restorers, files, None, "net_g.pth", "fp32", 64, tmp_path / "out", lambda *step: reported.append(step))
    assert len(written) == 2
    restorers.get("net_g.pth", "fp32", 128, "cpu")
    assert list(restorers.loaded) == [("net_g.pth", "fp32", 128, "cpu")]  # one network at a time
    assert reported == [
        (0.0, "photo 1 of 2"),
        (4 / 6 / 2, "photo 1 of 2: tile 4 of 6"),
        (0.5, "photo 1 of 2: tile 6 of 6"),
        (0.5, "photo 2 of 2"),
        (0.5 + 4 / 6 / 2, "photo 2 of 2: tile 4 of 6"),
        (1.0, "photo 2 of 2: tile 6 of 6"),
    ]
