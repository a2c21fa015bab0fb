"""onnxruntime against PyTorch on one machine: the same exported network, the same image.

    python benchmarks/onnx_speed.py                       # the quickstart Restormer, 512 x 512, CPU
    python benchmarks/onnx_speed.py --model paper --size 256x256

Both run float32 on the CPU with every core; each figure is the median of ``--repeats`` runs after
one warm-up. Compare the ratio within one run: absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deblur_diffusion.export import export_onnx
from deblur_diffusion.models import Restormer

ARCHITECTURES = {
    # conf/experiment/quickstart.yaml's network
    "quickstart": {"dim": 16, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 2, 2]},
    # the paper configuration (conf/model/restormer.yaml)
    "paper": {},
}


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(ARCHITECTURES), default="quickstart")
    parser.add_argument("--size", default="512x512", help="HxW of the image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime

    height, width = (int(side) for side in args.size.split("x"))
    torch.manual_seed(0)
    net = Restormer(**ARCHITECTURES[args.model]).eval()
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"params": net.state_dict()}, Path(folder) / "net_g.pth")
        path, _ = export_onnx(Path(folder) / "net_g.pth", folder)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        image = torch.rand(1, 3, height, width)
        with torch.no_grad():
            pytorch = median_seconds(lambda: net(image), args.repeats)
        feed = {"blurry": image.numpy()}
        onnx = median_seconds(lambda: session.run(None, feed), args.repeats)
    table = Table(title=f"{args.model} Restormer, {height}x{width}, CPU ({torch.get_num_threads()} threads), median of {args.repeats}")
    for column in ("runtime", "seconds", "vs PyTorch"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    table.add_row("PyTorch (eager, float32)", f"{pytorch:.3f}", "1.00x")
    table.add_row(f"onnxruntime {onnxruntime.__version__}", f"{onnx:.3f}", f"{pytorch / onnx:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
