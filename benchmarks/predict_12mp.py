"""``predict`` on a 12-megapixel photograph (4000 x 3000) on this machine: seconds and peak memory.

    python benchmarks/predict_12mp.py                      # the table of the README (about 6 min on 2 cores)
    python benchmarks/predict_12mp.py --models quickstart

Rows, for the quickstart Restormer and the paper-size one (random weights: the speed does not
depend on them):

* the official test script's approach: the whole image at once, fp32 (``max_pixels`` above the
  image), under a ``--memory-limit`` address-space cap (as every row that holds the whole image) so
  that running out of memory fails in the process instead of swapping the machine;
* ``predict``'s default on a CPU: 12 MP is above ``max_pixels=auto`` (4 MP here), so 256 px tiles
  every 220 px, fp32;
* ``precision=bf16`` and onnxruntime on the same tiles.

Every row runs in a fresh process, whose peak resident memory (``ru_maxrss``, Python and PyTorch
included) is its memory figure. Rows marked "extrapolated" time one 256 px tile and multiply by the
image's tile count (the tiled run restores each tile alone, so its time is that sum); a whole paper-
size run would take the better part of an hour per row on 2 cores. Their memory is the one-tile
process's plus the float32 image buffers the tiled run keeps (input, output, weights: 3 x 144 MiB).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

WIDTH, HEIGHT = 4000, 3000
TILE, STRIDE = 256, 220
ARCHITECTURES = {
    # conf/experiment/quickstart.yaml's network
    "quickstart": {"dim": 16, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 2, 2]},
    # the paper configuration (conf/model/restormer.yaml)
    "paper": {},
}
# The image buffers a tiled run holds beside one tile's activations (float32 input, output, weights).
TILED_IMAGE_BUFFERS_MIB = 3 * WIDTH * HEIGHT * 3 * 4 / 2**20


def tile_count() -> int:
    def along(side: int) -> int:
        return math.ceil((side - TILE) / STRIDE) + 1

    return along(HEIGHT) * along(WIDTH)


def write_photo(folder: Path) -> Path:
    """A 12 MP photograph: scikit-image's astronaut enlarged (bicubic), with mild noise."""
    from skimage import data

    picture = Image.fromarray(data.astronaut()).resize((WIDTH, HEIGHT), Image.BICUBIC)
    noisy = np.asarray(picture, dtype=np.float32) + np.random.default_rng(0).normal(0, 2, (HEIGHT, WIDTH, 3))
    (folder / "photos").mkdir()
    path = folder / "photos" / "photo.png"
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
    return path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_predict(weights: Path, photo: Path, out: Path, *overrides: str) -> None:
    from hydra import compose, initialize_config_dir

    from deblur_diffusion.cli import config_dir
    from deblur_diffusion.predict import predict

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        paths = [f"paths.root_dir={out.parent}", f"paths.output_dir={out.parent}"]  # no Hydra run to take them from
        cfg = compose("predict", overrides=[f"ckpt={weights}", f"input={photo}", f"output={out}", "device=cpu", *paths, *overrides])
    _, failures = predict(cfg)
    if failures:
        raise RuntimeError(next(iter(failures.values())))


def one_tile(net: torch.nn.Module, precision: str, weights: Path, folder: Path) -> float:
    """Seconds of one 256 px tile (after a warm-up) in PyTorch at ``precision``, or onnxruntime."""
    tile = torch.rand(1, 3, TILE, TILE)
    if precision == "onnx":
        import onnxruntime

        from deblur_diffusion.export import export_onnx

        path, _ = export_onnx(weights, folder / "onnx")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def forward():
            return session.run(None, {"blurry": tile.numpy()})
    else:
        dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

        def forward():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return net(tile)

    forward()
    start = time.perf_counter()
    forward()
    return time.perf_counter() - start


def child(row: str, model: str, folder: Path, memory_limit_gib: float | None) -> dict:
    """Runs one row in this (fresh) process and returns its figures."""
    from deblur_diffusion.models import Restormer

    torch.manual_seed(0)
    net = Restormer(**ARCHITECTURES[model]).eval()
    weights = folder / f"{model}.pth"
    torch.save({"params": net.state_dict()}, weights)
    photo = folder / "photos" / "photo.png"
    out = folder / f"out_{model}_{row}"
    start = time.perf_counter()
    if memory_limit_gib is not None:
        limit = int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        if row == "whole":
            run_predict(weights, photo, out, f"max_pixels={WIDTH * HEIGHT}")
        elif row == "tiles":
            run_predict(weights, photo, out, f"inference.tile_size={TILE}", f"inference.stride={STRIDE}")
        elif row == "onnx_whole":
            import onnxruntime

            from deblur_diffusion.export import export_onnx

            path, _ = export_onnx(weights, folder / f"onnx_{model}")
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            image = np.asarray(Image.open(photo), dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
            start = time.perf_counter()
            session.run(None, {"blurry": image})
        else:  # one tile of fp32, bf16 or onnx, extrapolated to the image
            seconds = one_tile(net, row.removeprefix("tile_"), weights, folder)
            return {"seconds": seconds * tile_count(), "peak_mib": peak_mib() + TILED_IMAGE_BUFFERS_MIB, "extrapolated": True}
    except (MemoryError, RuntimeError) as error:
        return {"error": str(error).splitlines()[0][:90], "seconds": time.perf_counter() - start, "peak_mib": peak_mib()}
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_mib()}


ROWS = {
    "quickstart": [
        ("whole", "official approach: whole image, fp32"),
        ("tiles", "predict default: 256 px tiles, fp32"),
        ("tile_bf16", "256 px tiles, bf16 (extrapolated)"),
        ("onnx_whole", "onnxruntime, whole image"),
        ("tile_onnx", "onnxruntime, 256 px tiles (extrapolated)"),
    ],
    "paper": [
        ("whole", "official approach: whole image, fp32"),
        ("tile_fp32", "predict default: 256 px tiles, fp32 (extrapolated)"),
        ("tile_bf16", "256 px tiles, bf16 (extrapolated)"),
        ("tile_onnx", "onnxruntime, 256 px tiles (extrapolated)"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--memory-limit", type=float, default=20.0, help="GiB of address space for the rows that are not extrapolated")
    parser.add_argument("--child", nargs=3, metavar=("ROW", "MODEL", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, model, folder = args.child
        print(json.dumps(child(row, model, Path(folder), args.limit)))
        return
    console = Console()
    table = Table(title=f"predict on a {WIDTH}x{HEIGHT} photo, CPU ({torch.get_num_threads()} threads), {tile_count()} tiles of {TILE} px")
    for column in ("model", "run", "seconds", "vs official", "peak memory (GiB)"):
        table.add_column(column, justify="left" if column in ("model", "run") else "right")
    results = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_photo(folder)
        for model in args.models:
            baseline = None
            for row, label in ROWS[model]:
                command = [sys.executable, __file__, "--child", row, model, str(folder)]
                if not row.startswith("tile_"):
                    command += ["--limit", str(args.memory_limit)]
                finished = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = finished.stdout.strip().splitlines()
                if finished.returncode or not lines:
                    figures = {
                        "error": (finished.stderr.strip().splitlines() or ["no output"])[-1][:90],
                        "seconds": float("nan"),
                        "peak_mib": float("nan"),
                    }
                else:
                    figures = json.loads(lines[-1])
                results[f"{model}/{row}"] = figures
                console.print(f"{model} {row}: {figures}", highlight=False)
                failed = "error" in figures
                if row == "whole" and not failed:
                    baseline = figures["seconds"]
                ratio = f"{baseline / figures['seconds']:.2f}x" if baseline and not failed else ""
                seconds = f"failed after {figures['seconds']:.0f} s: {figures['error']}" if failed else f"{figures['seconds']:.1f}"
                table.add_row(model, label, seconds, ratio, f"{figures['peak_mib'] / 1024:.2f}")
    console.print(table)
    console.print_json(json.dumps(results))


if __name__ == "__main__":
    main()
