"""Training patches per second on one core: whole-image folders vs the prepared crop store.

    python benchmarks/data_throughput.py                      # 4 pairs of each size, 256 px patches
    python benchmarks/data_throughput.py --pairs 8 --seconds 20

Writes synthetic files shaped like the real datasets into a temporary folder:

* GoPro-size: 1280 x 720 8-bit PNG pairs (flat ``input/target`` layout);
* DPDD-size: 1680 x 1120 16-bit PNG dual-pixel pairs (``inputL``, ``inputR``, ``target``) with a
  16-bit prior, i.e. the 9-channel prior-fused Swintormer input: three input planes and a target.

Their content is scikit-image's photographs resized to the frame with mild noise, so that PNG
compression, and decoding time, resemble real photographs. Every row produces the same thing, a
float32 ``TrainPatches`` sample (crop, flips, rotation, conversion), from a different source:

* ``folder, whole image to float`` : the loader before the prepared store (whole images decoded and
  converted to float, then cropped), reproduced by feeding ``TrainPatches`` the float images;
* ``folder`` : the current folder loader (decode, crop, convert the patch only);
* ``store raw`` / ``store png`` : the official crops prepared with ``prepare_store`` in each encoding;
* ``memory-mapped array (floor)`` : each whole image as a ``.npy`` file opened with ``np.load(mmap_mode="r")``,
  the cheapest possible reader of uncompressed pixels.

Files are in the page cache (just written), as they are for a dataset that fits in memory. One
process, one thread: multiply by the data workers for a node's rate.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
from rich.console import Console
from rich.table import Table

from deblur_diffusion.data import DPDD, GoPro, PairSource
from deblur_diffusion.data.crops import CropRule
from deblur_diffusion.data.io import write_image
from deblur_diffusion.data.patches import PatchKey, TrainPatches
from deblur_diffusion.data.prepared import PreparedCrops
from deblur_diffusion.data.priors import WithPrior
from deblur_diffusion.data.sources import PairPlanes
from deblur_diffusion.data.store_writer import prepare_store

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "brick", "hubble_deep_field")


def photo_frame(index: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    image = getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    frame = cv2.resize(image[:, :, :3], (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    return np.clip(frame + rng.normal(0, 0.01, frame.shape).astype(np.float32), 0, 1)


def write_gopro(root: Path, pairs: int) -> GoPro:
    rng = np.random.default_rng(0)
    for index in range(pairs):
        sharp = photo_frame(index, 720, 1280, rng)
        write_image(root / "train" / "target" / f"{index:04d}.png", sharp)
        write_image(root / "train" / "input" / f"{index:04d}.png", cv2.GaussianBlur(sharp, (0, 0), 2.0))
    return GoPro(root, "train")


def write_dpdd(root: Path, pairs: int) -> PairSource:
    rng = np.random.default_rng(1)
    for index in range(pairs):
        sharp = photo_frame(index, 1120, 1680, rng)
        name = f"{index:04d}.png"
        write_image(root / "train" / "target" / name, sharp, 16)
        for view, shift in (("L", -3), ("R", 3), ("C", 0)):
            view_image = np.roll(cv2.GaussianBlur(sharp, (0, 0), 3.0), shift, axis=1)
            write_image(root / "train" / f"input{view}" / name, view_image, 16)
        write_image(root / "priors" / "train" / name, cv2.GaussianBlur(sharp, (0, 0), 1.5), 16)
    return WithPrior(DPDD(root, "train", views=["l", "r"]), root / "priors" / "train")


class WholeImagesAsFloat(PairSource):
    """The previous loader's work: whole images decoded and converted to float before cropping."""

    def __init__(self, source: PairSource):
        self.source = source
        self.in_channels = source.in_channels

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.source.load(index, rng)


class MemoryMappedArrays(PairSource):
    """Each whole plane as an uncompressed ``.npy`` file, memory-mapped: the floor of reading cost."""

    def __init__(self, source: PairSource, folder: Path):
        self.in_channels = source.in_channels
        self.names = [source.name(index) for index in range(len(source))]
        self.paths = []
        for index in range(len(source)):
            planes = source.load_planes(index, None)
            paths = []
            for number, plane in enumerate((*planes.inputs, planes.target)):
                path = folder / f"{index}_{number}.npy"
                np.save(path, plane)
                paths.append(path)
            self.paths.append(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.names[index]

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.load_planes(index, rng).to_float()

    def load_planes(self, index: int, rng: np.random.Generator | None = None) -> PairPlanes:
        planes = [np.load(path, mmap_mode="r") for path in self.paths[index]]
        return PairPlanes(planes[:-1], planes[-1])


def patches_per_second(source: PairSource, patch: int, seconds: float) -> tuple[float, int]:
    """Samples random keys for about ``seconds``; returns (patches/s, patches drawn)."""
    dataset = TrainPatches(source)
    rng = np.random.default_rng(0)
    dataset[PatchKey(0, patch, 0)]  # first touch: open files and stores
    drawn, start = 0, time.perf_counter()
    while drawn < 3 or time.perf_counter() - start < seconds:
        dataset[PatchKey(int(rng.integers(len(source))), patch, int(rng.integers(2**31)))]
        drawn += 1
    return drawn / (time.perf_counter() - start), drawn


def decodes_per_second(source: PairSource, seconds: float) -> float:
    """Pairs decoded per second (every plane, nothing else): the folder path's upper bound."""
    drawn, start = 0, time.perf_counter()
    while drawn < 3 or time.perf_counter() - start < seconds:
        source.load_planes(drawn % len(source), None)
        drawn += 1
    return drawn / (time.perf_counter() - start)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="pairs written per dataset shape")
    parser.add_argument("--patch", type=int, default=256, help="training patch size")
    parser.add_argument("--seconds", type=float, default=8.0, help="time spent on each row")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deblur_data_bench_"))
    console = Console(width=200)
    datasets = {
        "GoPro-size 8-bit (1280x720), 1 input + target": (write_gopro, CropRule(512, 256)),
        "DPDD-size 16-bit dual-pixel + prior (1680x1120), 3 inputs + target": (write_dpdd, CropRule(512, 204, 0.7)),
    }
    table = Table(title=f"{args.patch} px training patches per second, one process, one thread")
    for column in ("data", "source", "patches/s", "vs floor", "vs previous", "disk MiB / pair", "prepare s / pair"):
        table.add_column(column, justify="left" if column in ("data", "source") else "right")
    try:
        for number, (label, (write, rule)) in enumerate(datasets.items()):
            root = workdir / f"dataset{number}"
            source = write(root, args.pairs)
            rows = {"folder, whole image to float (previous loader)": (WholeImagesAsFloat(source), folder_size(root), None)}
            rows["folder"] = (source, folder_size(root), None)
            for encoding in ("raw", "png"):
                store = root / f"store_{encoding}"
                start = time.perf_counter()
                prepare_store(source, store, rule, encoding)
                rows[f"store {encoding}"] = (PreparedCrops(store), folder_size(store), time.perf_counter() - start)
            (root / "npy").mkdir()
            rows["memory-mapped array (floor)"] = (MemoryMappedArrays(source, root / "npy"), folder_size(root / "npy"), None)
            rates = {name: patches_per_second(row[0], args.patch, args.seconds)[0] for name, row in rows.items()}
            rows["folder, decoding alone (its upper bound)"] = (source, rows["folder"][1], None)
            rates["folder, decoding alone (its upper bound)"] = decodes_per_second(source, args.seconds)
            floor, previous = rates["memory-mapped array (floor)"], rates["folder, whole image to float (previous loader)"]
            for name, (_, size, prepare_seconds) in rows.items():
                table.add_row(
                    label if name.startswith("folder, whole") else "",
                    name,
                    f"{rates[name]:,.1f}",
                    f"{rates[name] / floor:.1%}",
                    f"{rates[name] / previous:.1f}x",
                    f"{size / len(source) / 2**20:,.1f}",
                    "" if prepare_seconds is None else f"{prepare_seconds / len(source):.2f}",
                )
            table.add_section()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print(table)


if __name__ == "__main__":
    main()
