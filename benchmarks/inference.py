"""Time and peak memory of whole-image vs overlapping-tile inference, and of a training step.

    python benchmarks/inference.py                        # paper configs, CUDA if available
    python benchmarks/inference.py --device cpu --sizes 512x512 --repeats 1

Models: Swintormer (official defaults, 6 channels) and Restormer (paper configuration, 3 channels).
Tiles: 256 px every 220 px (the Swintormer protocol), ``--tile-batch`` tiles per call. The training
step is forward + backward + AdamW step on a batch of ``--train-batch`` patches of 256 px, for
Swintormer also with the official activation checkpointing. Peak memory is the CUDA allocator's
peak on a GPU and the peak resident-set growth of this process on a CPU (sampled every 5 ms).
Compare figures within one run (ratios); absolute CPU times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deblur_diffusion.inference import Inference
from deblur_diffusion.models import Restormer, Swintormer

MODELS: dict[str, tuple[Callable[..., torch.nn.Module], int]] = {
    "swintormer": (Swintormer, 6),
    "restormer": (Restormer, 3),
}


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS so that resident memory reflects live data only."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            self._base = _resident_bytes()
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _resident_bytes() - self._base)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, _resident_bytes() - self._base)


def measure(run: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times, peak = [], 0
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak)
    return sorted(times)[len(times) // 2], peak / 2**20


def parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(512, 512), (1120, 1680), (2048, 2048)])
    parser.add_argument("--modes", nargs="+", default=["whole", "tiles"], choices=["whole", "tiles"])
    parser.add_argument("--tile-batch", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (CUDA needs one)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    console = Console(width=150)

    table = Table(title=f"Inference and training step on {device} (fp32, tiles 256/220, batch {args.tile_batch})")
    for column in ("model", "work", "size", "seconds", "peak MiB", "time vs whole", "memory vs whole"):
        table.add_column(column, justify="left" if column in ("model", "work") else "right")

    for name in args.models:
        factory, channels = MODELS[name]
        torch.manual_seed(0)
        model = factory().to(device).eval()
        for height, width in args.sizes:
            image = torch.rand(1, channels, height, width, device=device)
            whole = None
            for mode in args.modes:
                inference = Inference(mode, tile_size=256, stride=220, tile_batch_size=args.tile_batch)
                with torch.no_grad():
                    seconds, peak = measure(
                        lambda inference=inference, model=model, image=image: inference(model, image), device, args.repeats, args.warmup
                    )
                if mode == "whole":
                    whole = (seconds, peak)
                ratios = (
                    ("", "") if whole is None or mode == "whole" else (f"{seconds / whole[0]:.2f}x", f"{peak / max(whole[1], 1e-9):.2f}x")
                )
                table.add_row(name, f"infer {mode}", f"{height}x{width}", f"{seconds:.3f}", f"{peak:.0f}", *ratios)
                console.print(f"measured {name} {mode} {height}x{width}: {seconds:.3f} s, {peak:.0f} MiB")
        if args.no_train:
            continue
        variants = [("train step", ())] + ([("train step, checkpointed", "official")] if name == "swintormer" else [])
        baseline = None
        for label, levels in variants:
            torch.manual_seed(0)
            network = (factory(checkpoint_levels=levels) if name == "swintormer" else factory()).to(device).train()
            optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
            patches = torch.rand(args.train_batch, channels, 256, 256, device=device)
            target = torch.rand(args.train_batch, 3, 256, 256, device=device)

            def step(optimizer=optimizer, network=network, patches=patches, target=target):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.l1_loss(network(patches), target).backward()
                optimizer.step()

            seconds, peak = measure(step, device, args.repeats, args.warmup)
            baseline = baseline or (seconds, peak)
            ratios = ("", "") if label == "train step" else (f"{seconds / baseline[0]:.2f}x", f"{peak / baseline[1]:.2f}x")
            table.add_row(name, label, f"{args.train_batch}x256x256", f"{seconds:.3f}", f"{peak:.0f}", *ratios)
            console.print(f"measured {name} {label}: {seconds:.3f} s, {peak:.0f} MiB")
    console.print(table)


if __name__ == "__main__":
    main()
