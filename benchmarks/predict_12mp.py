"""``predict`` on a 12-megapixel photograph (4000 x 3000) on this machine: seconds and peak memory.

    python benchmarks/predict_12mp.py                      # the table of docs/benchmarks.md (about 25 min on 2 cores)
    python benchmarks/predict_12mp.py --models quickstart

Rows, for the quickstart Restormer, the paper-size Restormer and the paper-size Swintormer (single
image, the released window of 16; random weights: the speed does not depend on them):

* the official test script's approach: the whole image at once, fp32 (``max_pixels`` above the
  image), under a ``--memory-limit`` address-space cap (as every row that holds the whole image) so
  that running out of memory fails in the process instead of swapping the machine;
* ``predict backend=torch``: 12 MP is above ``max_pixels=auto`` (4 MP on a CPU), so 256 px tiles
  every 220 px, fp32, through PyTorch;
* the ONNX export that ``backend=auto`` makes once per weights (into an empty cache);
* ``predict``'s default on a CPU (``backend=auto``: ONNX Runtime) on the same tiles, the graph in the cache.

Every row runs in a fresh process, whose peak resident memory (``ru_maxrss``, Python and PyTorch
included) is its memory figure. Rows marked "extrapolated" time one 256 px tile through the
``Restorer`` that ``predict`` uses and multiply by the image's tile count (the tiled run restores
each tile alone, so its time is that sum); a whole paper-size run would take the better part of an
hour per row on 2 cores. Their memory is the one-tile process's plus the float32 image buffers the
tiled run keeps (input, output, weights: 3 x 144 MiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    "quickstart": ("Restormer", {"dim": 16, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 2, 2]}),
    # the paper configurations (conf/model/restormer.yaml; Swintormer on one image)
    "paper": ("Restormer", {}),
    "swintormer": ("Swintormer", {"inp_channels": 3}),
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


def network(model: str) -> torch.nn.Module:
    from deblur_diffusion import models

    name, arguments = ARCHITECTURES[model]
    torch.manual_seed(0)
    return getattr(models, name)(**arguments).eval()


def one_tile(net: torch.nn.Module, backend: str, net_config: dict) -> float:
    """Seconds of one 256 px tile (after a warm-up) through predict's Restorer."""
    from deblur_diffusion.restorer import Restorer

    restorer = Restorer(net, device="cpu", backend=backend, net_config=net_config)
    tile = torch.rand(1, net.input_channels, TILE, TILE)
    restorer.restore(tile)
    start = time.perf_counter()
    restorer.restore(tile)
    return time.perf_counter() - start


def child(row: str, model: str, folder: Path, memory_limit_gib: float | None) -> dict:
    """Runs one row in this (fresh) process and returns its figures."""
    from deblur_diffusion.inference.onnx import cached_graph
    from deblur_diffusion.weights import load_network

    weights = folder / f"{model}.pth"
    if not weights.exists():
        torch.save({"params": network(model).state_dict()}, weights)
    # The network and architecture config as predict reads them: the ONNX graph's cache key, so that
    # the export row's graph is the one the ONNX Runtime rows (and predict) find in the cache.
    loaded = load_network(str(weights))
    net = loaded.net.eval()
    photo = folder / "photos" / "photo.png"
    out = folder / f"out_{model}_{row}"
    start = time.perf_counter()
    if memory_limit_gib is not None:
        limit = int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        if row == "whole":
            run_predict(weights, photo, out, f"max_pixels={WIDTH * HEIGHT}", "backend=torch")
        elif row == "tiles_torch":
            run_predict(weights, photo, out, f"inference.tile_size={TILE}", f"inference.stride={STRIDE}", "backend=torch")
        elif row == "tiles":
            run_predict(weights, photo, out, f"inference.tile_size={TILE}", f"inference.stride={STRIDE}")
        elif row == "export":
            cached_graph(net, loaded.net_config)
        else:  # one tile through PyTorch or ONNX Runtime, extrapolated to the image
            seconds = one_tile(net, row.removeprefix("tile_"), loaded.net_config)
            return {"seconds": seconds * tile_count(), "peak_mib": peak_mib() + TILED_IMAGE_BUFFERS_MIB, "extrapolated": True}
    except (MemoryError, RuntimeError) as error:
        return {"error": str(error).splitlines()[0][:90], "seconds": time.perf_counter() - start, "peak_mib": peak_mib()}
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_mib()}


PAPER_ROWS = [
    ("whole", "official approach: whole image, fp32"),
    ("tile_torch", "backend=torch: 256 px tiles, fp32 (extrapolated)"),
    ("export", "ONNX export, once per weights"),
    ("tile_onnxruntime", "ONNX Runtime (predict's default on a CPU once the graph is cached), 256 px tiles (extrapolated)"),
]
ROWS = {
    "quickstart": [
        ("whole", "official approach: whole image, fp32"),
        ("tiles_torch", "backend=torch: 256 px tiles, fp32"),
        ("export", "ONNX export, once per weights"),
        ("tiles", "predict default: ONNX Runtime, 256 px tiles"),
    ],
    "paper": PAPER_ROWS,
    "swintormer": PAPER_ROWS,
}

# The speed-up column: PyTorch's tiles against the whole image, ONNX Runtime's against PyTorch's tiles.
SPEED_BASELINE = {"tiles_torch": "whole", "tile_torch": "whole", "tiles": "tiles_torch", "tile_onnxruntime": "tile_torch"}


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
    for column in ("model", "run", "seconds", "speed-up", "peak memory (GiB)"):
        table.add_column(column, justify="left" if column in ("model", "run") else "right")
    results = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_photo(folder)
        os.environ["DEBLUR_DIFFUSION_CACHE"] = str(folder / "cache")  # the rows' children share it
        os.environ.pop("DEBLUR_DIFFUSION_BACKEND", None)
        for model in args.models:
            seconds_of = {}
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
                if not failed:
                    seconds_of[row] = figures["seconds"]
                baseline = seconds_of.get(SPEED_BASELINE.get(row, ""))
                ratio = f"{baseline / figures['seconds']:.2f}x" if baseline and not failed else ""
                seconds = f"failed after {figures['seconds']:.0f} s: {figures['error']}" if failed else f"{figures['seconds']:.1f}"
                table.add_row(model, label, seconds, ratio, f"{figures['peak_mib'] / 1024:.2f}")
    console.print(table)
    console.print_json(json.dumps(results))


if __name__ == "__main__":
    main()
