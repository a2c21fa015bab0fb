"""A web app that restores photos in the browser: ``python -m deblur_diffusion.app ckpt=... [port=7860] [host=127.0.0.1]``.

Built on ``predict``'s own restoring code (:func:`deblur_diffusion.predict.restore_file`): a photo
restored here is the file ``predict`` writes with the same weights and options, pixel for pixel,
upright, with its bit depth, EXIF and ICC profile. Drop one or many photos, choose the model
(``ckpt=`` one file, or a mapping of names to files: checkpoints, exports, official files, URLs),
the device, the precision and the tile size; the result is shown on a before/after slider with a
zoom, and comes back as the restored file (several photos: a zip). Dual-pixel models take the left views and the
right views, matched by order; prior-fused models sample their prior as ``predict`` does
(``prior.ckpt``, ``prior.ldm_config``). One job runs at a time (a queue), large photos go on tiles,
and a file that cannot be restored is named in the status while the server stays up. Memory stays
bounded: one model is loaded at a time, and the results of all but the last few jobs are deleted.

The endpoint ``/restore`` (``gradio_client``: ``client.predict(handle_file(path), api_name="/restore")``)
takes one image file and returns the restored file first. Needs the ``app`` extra (Gradio).
"""

from __future__ import annotations

import atexit
import copy
import gc
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from deblur_diffusion.cli import config_dir, report_errors, require_complete, restorer_and_record
from deblur_diffusion.data.io import read_photo, to_float, to_integer_image, unsupported_reason
from deblur_diffusion.errors import ConfigError, DeblurError
from deblur_diffusion.inference.onnx import BACKEND_NAMES
from deblur_diffusion.predict import Photo, PriorSource, model_views, restore_file
from deblur_diffusion.restorer import whole_image_budget

PRECISION_CHOICES = ("fp32", "bf16", "fp16")
EXAMPLES = 3
# Jobs whose results stay on disk (the newest; Gradio keeps its own copy of what it served).
KEPT_JOBS = 4


def _models(cfg: DictConfig) -> dict[str, object]:
    """The weights the app offers, by name: ``ckpt`` as one file (named after it) or a mapping."""
    ckpt = OmegaConf.to_container(cfg.ckpt, resolve=True) if OmegaConf.is_config(cfg.ckpt) else cfg.ckpt
    if isinstance(ckpt, dict) and not {"transformer", "denoiser"} & set(ckpt):
        return ckpt
    return {Path(str(ckpt)).name if not isinstance(ckpt, dict) else "HI-Diff": ckpt}


def device_choices(configured: str) -> list[str]:
    """The devices offered in the page: ``auto``, the CPU, the GPU where there is one, and what was configured."""
    choices = ["auto", "cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    return choices if configured in choices else [*choices, configured]


class Restorers:
    """The model in use for (name, precision, tile size, device), loaded on first use; one at a
    time (jobs run one after another), so that trying options does not pile networks up in memory."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.models = _models(cfg)
        self.loaded: dict[tuple, tuple] = {}

    def key(self, name: str, precision: str, tile_size: int, device: str | None = None) -> tuple:
        return (name, precision, int(tile_size), device or str(self.cfg.device))

    def get(self, name: str, precision: str, tile_size: int, device: str | None = None):
        key = self.key(name, precision, tile_size, device)
        if key not in self.loaded:
            self.loaded.clear()
            gc.collect()  # the previous network, before the next one is loaded
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cfg = copy.deepcopy(self.cfg)
            with open_dict(cfg):
                cfg.ckpt = self.models[name]
                cfg.device = key[3]
                cfg.precision = precision
                if int(tile_size) != cfg.inference.tile_size:  # the overlap keeps its share of the tile
                    cfg.inference.stride = max(1, cfg.inference.stride * int(tile_size) // cfg.inference.tile_size)
                    cfg.inference.tile_size = int(tile_size)
            restorer, _ = restorer_and_record(cfg)
            with_prior = cfg.prior.dir is not None or cfg.prior.ckpt is not None
            views, _ = model_views(cfg, restorer, with_prior)
            prior = PriorSource(cfg, restorer.device) if with_prior else None
            self.loaded[key] = (restorer, views, prior, whole_image_budget(restorer, cfg.max_pixels))
        return self.loaded[key]


def restore_files(
    restorers: Restorers,
    files: list[str],
    second_views: list[str],
    name: str,
    precision: str,
    tile_size: int,
    out: Path,
    report: Callable[[float, str], None] | None = None,
    device: str | None = None,
):
    """Restores ``files`` (and for dual-pixel models ``second_views``, matched by order) into ``out``
    as ``predict`` does; returns the files written and ``{file: reason}`` for those it could not.
    ``report(fraction, text)`` follows the photos and their tiles."""
    restorer, views, prior, max_pixels = restorers.get(name, precision, tile_size, device)
    written, failures = [], {}
    pairs = [[Path(f)] for f in files]
    if len(views) == 2:
        if len(second_views or []) != len(files):
            raise ConfigError(f"this model reads two dual-pixel views ({views}): give as many second views as photos")
        pairs = [[Path(a), Path(b)] for a, b in zip(files, second_views, strict=True)]
    for number, paths in enumerate(pairs):
        if report is not None:

            def tiles_done(done: int, total: int, number: int = number) -> None:
                report((number + done / total) / len(pairs), f"photo {number + 1} of {len(pairs)}: tile {done} of {total}")

            _report_tiles(restorer, tiles_done)
            report(number / len(pairs), f"photo {number + 1} of {len(pairs)}")
        reason = unsupported_reason(paths[0])
        if reason:
            failures[paths[0].name] = reason
            continue
        try:
            written.append(
                restore_file(restorer, Photo(paths[0].stem, paths, paths[0]), out, max_pixels, prior, restorers.cfg.jpeg_quality)
            )
        except DeblurError as error:
            failures[paths[0].name] = str(error)
    _report_tiles(restorer, None)  # the restorer outlives this job's progress bar
    return written, failures


def _report_tiles(restorer, reporter: Callable[[int, int], None] | None) -> None:
    for inference in (restorer.inference, restorer.fallback):  # the tiles of an out-of-memory fallback too
        if inference is not None:
            inference.report_tiles = reporter


def _shown(path: Path) -> np.ndarray:
    """An image file as 8-bit RGB for the slider (upright, as restored)."""
    pixels, _ = read_photo(path)
    return to_integer_image(to_float(pixels), 8)


def build_app(cfg: DictConfig, work: Path | None = None):
    """The Gradio Blocks of the app for a composed ``conf/app.yaml``; examples and results go to
    ``work`` (a temporary folder deleted at exit when not given)."""
    import gradio as gr

    restorers = Restorers(cfg)
    names = list(restorers.models)
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="deblur_app_"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    examples = _example_photos(work / "examples")
    jobs = work / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)

    def restore_photos(files, second_views, name, precision, tile_size, device, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        if not files:
            raise gr.Error("drop one or more photos first")
        earlier = sorted(jobs.iterdir(), key=lambda folder: folder.stat().st_mtime)
        for old in earlier[: max(0, len(earlier) - (KEPT_JOBS - 1))]:  # with this job's, KEPT_JOBS remain
            shutil.rmtree(old, ignore_errors=True)
        out = Path(tempfile.mkdtemp(dir=jobs))
        if restorers.key(name, precision, tile_size, device) in restorers.loaded:
            progress(0, desc=f"restoring {len(files)} photo(s)")
        else:  # the first restore with these options waits for the model (and on a CPU for its ONNX export)
            progress(0, desc=f"loading {name} (the first time on a CPU: its ONNX graph is exported once, up to a few minutes)")
        try:
            written, failures = restore_files(
                restorers,
                files,
                second_views,
                name,
                precision,
                tile_size,
                out,
                lambda fraction, text: progress(fraction, desc=text),
                device,
            )
        except DeblurError as error:
            raise gr.Error(str(error)) from error
        restorer = restorers.get(name, precision, tile_size, device)[0]
        status = f"restored {len(written)} of {len(files)} on {restorer.device} through {BACKEND_NAMES[restorer.backend]}" + "".join(
            f"\n{file}: {reason}" for file, reason in failures.items()
        )
        if not written:
            return None, None, status
        download = written[0]
        if len(written) > 1:
            download = out / "restored.zip"
            with zipfile.ZipFile(download, "w") as archive:
                for path in written:
                    archive.write(path, path.name)
        before = _shown(Path(files[0])) if not failures.get(Path(files[0]).name) else None
        slider = (before, _shown(written[0])) if before is not None else None
        return str(download), slider, status

    def restore(file, name, precision, tile_size, device):
        """One image file in, the restored image file out (what ``predict`` writes)."""
        download, slider, status = restore_photos([file], None, name, precision, tile_size, device)
        if download is None:
            raise gr.Error(status)
        return download, slider

    # Gradio's copies of what it served are deleted after a day, checked every hour.
    with gr.Blocks(title="deblur-diffusion", delete_cache=(3600, 86400)) as app:
        gr.Markdown(
            "# Deblur photos\nDrop photos, restore them, compare before and after "
            "(drag the line; the mouse wheel zooms both, dragging the picture moves them)."
        )
        with gr.Row():
            with gr.Column():
                photos = gr.File(label="photos (one or many)", file_count="multiple", file_types=["image"])
                second = gr.File(label="right views (dual-pixel models only, in the same order)", file_count="multiple")
                model = gr.Dropdown(names, value=names[0], label="model")
                with gr.Row():
                    device = gr.Dropdown(device_choices(str(cfg.device)), value=str(cfg.device), label="device")
                    precision = gr.Radio(list(PRECISION_CHOICES), value=str(cfg.precision), label="precision")
                tiles = gr.Slider(64, 1024, value=int(cfg.inference.tile_size), step=32, label="tile size (px) for large photos")
                button = gr.Button("Restore", variant="primary")
            with gr.Column():
                slider = gr.ImageSlider(label="before / after", type="numpy", format="png")
                download = gr.File(label="restored file (several: a zip)")
                status = gr.Textbox(label="status", lines=3)
        if examples:
            gr.Examples([[[str(path)]] for path in examples], inputs=[photos], label="synthetic blurry examples")
        # One queue for both events: one job at a time, whichever asked (one model in memory).
        button.click(
            restore_photos,
            [photos, second, model, precision, tiles, device],
            [download, slider, status],
            api_name="restore_photos",
            concurrency_id="restore",
        )
        # The API endpoint: one file in, the restored file first out.
        with gr.Row(visible=False):
            one = gr.File(label="image")
            one_out = gr.File(label="restored")
            one_slider = gr.ImageSlider(type="numpy", format="png")
            one_button = gr.Button("restore one")
        one_button.click(
            restore, [one, model, precision, tiles, device], [one_out, one_slider], api_name="restore", concurrency_id="restore"
        )
    app.queue(default_concurrency_limit=1)
    return app


def _example_photos(folder: Path) -> list[Path]:
    """A few blurry images of the embedded synthetic data, so that the app shows something at once."""
    from deblur_diffusion.data.synthesize import synthesize

    synthesize(folder, train_pairs=0, test_pairs=EXAMPLES, image_size=256)
    return sorted((folder / "test" / "input").glob("*.png"))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="app")
@report_errors
def main(cfg: DictConfig) -> None:
    require_complete(cfg, unused=("data.", "model."))
    app = build_app(cfg)
    app.launch(server_name=cfg.host, server_port=int(cfg.port), share=False, show_error=True)


if __name__ == "__main__":
    main()
