"""Visual reports: ``report.html`` beside an evaluation's ``summary.md``, and one for two runs from
``compare``.

A report is a folder that opens from ``file://`` with nothing fetched from the network: the page
(its script and styles inline, the numbers embedded as JSON) and its pictures in ``report/`` beside
it. Per image: the blurry input, the restoration, the sharp image and an error map
(|restored - sharp|, amplified, in a colour map), at most ``DISPLAY_SIDE`` px, and a thumbnail. The
page shows the summary table, galleries of the largest gains and losses, and one row per image with
its metrics and gains, sorted by PSNR gain (largest first), sortable by any column, in pages of
``PAGE_ROWS``; a row opens a viewer with a before/after slider and a zoom that moves both images
and the error map together.

The numbers are those ``evaluate`` and ``compare`` computed; this module only lays them out.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from deblur_diffusion.data.io import to_integer_image, write_atomically

PICTURES = "report"
# {image name: its pictures} of an evaluation, which a comparison report of two runs reads.
REPORT_IMAGES = "report_images.json"
DISPLAY_SIDE = 1024
THUMBNAIL_SIDE = 160
# |restored - sharp| x ERROR_GAIN, clipped to 1, before the colour map (errors of 1/8 saturate it).
ERROR_GAIN = 8.0
PAGE_ROWS = 50
JPEG_QUALITY = 92


def _fitted(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale == 1.0:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"cannot encode {path}")
    write_atomically(path, encoded.tobytes())


class ReportPictures:
    """Writes the pictures of each evaluated image into ``folder`` (``report/`` of the evaluation)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, number: int, blurry: torch.Tensor, restored: torch.Tensor, sharp: torch.Tensor) -> dict[str, str]:
        """Writes the pictures of image ``number`` (C x H x W tensors in [0, 1]); returns their
        paths relative to the report page."""
        views = {
            name: tensor[:3].permute(1, 2, 0).float().numpy()
            for name, tensor in (("blurry", blurry), ("restored", restored), ("sharp", sharp))
        }
        error = np.clip(np.abs(views["restored"] - views["sharp"]).mean(axis=2) * ERROR_GAIN, 0.0, 1.0)
        coloured = cv2.applyColorMap(to_integer_image(error, 8), cv2.COLORMAP_INFERNO)[:, :, ::-1]
        paths = {}
        for name, image in (*views.items(), ("error", None)):
            pixels = coloured if image is None else to_integer_image(image, 8)
            paths[name] = f"{PICTURES}/{number:05d}_{name}.jpg"
            _write_jpeg(self.folder.parent / paths[name], _fitted(pixels, DISPLAY_SIDE))
        paths["thumbnail"] = f"{PICTURES}/{number:05d}_thumbnail.jpg"
        _write_jpeg(self.folder.parent / paths["thumbnail"], _fitted(to_integer_image(views["restored"], 8), THUMBNAIL_SIDE))
        return paths


def _page(title: str, data: dict) -> str:
    payload = json.dumps(data).replace("</", "<\\/")
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_evaluation_report(
    output_dir: Path, rows: list[dict], summary: dict, metrics: list[str], columns: dict[str, str], caption: str
) -> Path:
    """``output_dir/report.html`` of an evaluation: ``rows`` as ``evaluate`` scored them (each with
    its ``pictures``), ``summary`` its groups' means."""
    lower_is_better = [m for m in metrics if m in ("mae", "lpips")]
    images = []
    for row in rows:
        gains = {m: row[m] - row[f"input_{m}"] for m in metrics}
        images.append(
            {
                "name": row["name"],
                "group": row["group"],
                "values": {m: row[m] for m in metrics},
                "gains": gains,
                "pictures": row["pictures"],
            }
        )
    data = {
        "kind": "evaluation",
        "caption": caption,
        "metrics": metrics,
        "columns": {m: columns[m] for m in metrics},
        "lower_is_better": lower_is_better,
        "summary": summary,
        "images": images,
        "page_rows": PAGE_ROWS,
        "views": {"left": "blurry", "right": "restored", "reference": "sharp"},
    }
    path = Path(output_dir) / "report.html"
    write_atomically(path, _page(f"Evaluation: {caption}", data))
    return path


def write_comparison_report(path: Path, baseline: Path, candidate: Path, comparison: dict) -> Path:
    """A report of ``candidate`` against ``baseline`` (evaluation folders): per image, the two
    restorations side by side on the slider, the change of each metric, sorted by PSNR change."""
    path = Path(path)

    def pictures_of(folder: Path) -> dict[str, dict]:
        record = folder / REPORT_IMAGES
        return json.loads(record.read_text()) if record.is_file() else {}

    before, after = pictures_of(Path(baseline)), pictures_of(Path(candidate))

    def relative(folder: Path, picture: str) -> str:
        return Path(os.path.relpath((folder / picture).resolve(), path.parent.resolve())).as_posix()

    images = []
    for name in comparison["shared"]:
        pictures = {}
        if name in before and name in after:
            pictures = {
                "blurry": relative(Path(candidate), after[name]["blurry"]),
                "restored": relative(Path(candidate), after[name]["restored"]),
                "baseline": relative(Path(baseline), before[name]["restored"]),
                "sharp": relative(Path(candidate), after[name]["sharp"]),
                "error": relative(Path(candidate), after[name]["error"]),
                "thumbnail": relative(Path(candidate), after[name]["thumbnail"]),
            }
        images.append(
            {
                "name": name,
                "group": "",
                "values": {m: comparison["after"][name][m] for m in comparison["metrics"]},
                "gains": {m: comparison["after"][name][m] - comparison["before"][name][m] for m in comparison["metrics"]},
                "pictures": pictures,
            }
        )
    data = {
        "kind": "comparison",
        "caption": f"{candidate} against {baseline}",
        "metrics": comparison["metrics"],
        "columns": {m: m.upper() for m in comparison["metrics"]},
        "lower_is_better": [m for m in comparison["metrics"] if m in ("mae", "lpips")],
        "summary": comparison["summary"],
        "images": images,
        "page_rows": PAGE_ROWS,
        "views": {"left": "baseline", "right": "restored", "reference": "sharp"},
    }
    write_atomically(path, _page(f"Comparison: {candidate} against {baseline}", data))
    return path


# The page: styles and script inline (nothing fetched), the report's data in place of __DATA__.
_TEMPLATE = (Path(__file__).parent / "report_template.html").read_text()
