"""One command for a machine with GPUs: a few training steps of every stage under each precision
and with ``torch.compile``, then DDP on the available devices, with throughput and peak memory.

    python benchmarks/gpu_check.py                    # every stage, paper-size networks, 256 px
    python benchmarks/gpu_check.py --stages restormer swintormer --patch 128 --batch 2 --steps 5

Each row runs ``python -m deblur_diffusion.train`` on the embedded synthetic data with the stage's
model config (``model.stage1_ckpt=null`` for HI-Diff stage two: it starts from scratch here) for
``--steps`` optimisation steps, and reads the images per second and the peak CUDA memory that the
run's ``GpuProbe`` callback writes. The first steps include compilation and cuDNN autotuning: the
figures are for comparing rows of one run, not for absolute speed claims.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

STAGES = {
    "restormer": ["model=restormer"],
    "swintormer": ["model=swintormer"],
    "hidiff_s1": ["model=hidiff_s1"],
    "hidiff_s2": ["model=hidiff_s2", "model.stage1_ckpt=null"],
    "ldm_autoencoder": ["model=ldm_autoencoder"],
    "ldm_prior": ["model=ldm_prior"],
    "ldm_decoder_finetune": ["model=ldm_decoder_finetune"],
}
VARIANTS = {
    "fp32": ["trainer.precision=32-true"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "16-mixed": ["trainer.precision=16-mixed"],
    "bf16 + compile": ["trainer.precision=bf16-mixed", "model.compile_network=true"],
}


class GpuProbe(L.Callback):
    """Times the training steps after the first two (warm-up) and records the peak CUDA memory."""

    def __init__(self, output: str):
        self.output = output
        self.started = None
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2 and self.started is None:
            torch.cuda.synchronize()
            self.started = time.perf_counter()
        elif self.started is not None:
            self.images += batch["lq"].shape[0] * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.started if self.started else float("nan")
        if trainer.is_global_zero:
            Path(self.output).write_text(
                json.dumps(
                    {
                        "images_per_second": self.images / elapsed if self.images else float("nan"),
                        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                    }
                )
            )


def run(stage: str, variant: list[str], devices: int, args, folder: Path) -> dict:
    output = folder / f"{stage}-{len(list(folder.iterdir()))}.json"
    trainer = ["trainer=ddp", f"trainer.devices={devices}"] if devices > 1 else ["trainer=gpu"]
    command = [
        sys.executable,
        "-m",
        "deblur_diffusion.train",
        *STAGES[stage],
        *trainer,
        *variant,
        f"trainer.max_steps={args.steps}",
        "trainer.val_check_interval=1000000",
        "trainer.num_sanity_val_steps=0",
        "trainer.accumulate_grad_batches=1",
        "test=false",
        "callbacks=none",
        "logger=csv",
        "data.num_workers=4",
        f"data.patch_schedule=[[0,{args.patch},{args.batch * devices}]]",
        f"data.train.image_size={max(args.patch, 256)}",
        "+callbacks.probe._target_=gpu_check.GpuProbe",
        f"+callbacks.probe.output={output}",
        f"hydra.run.dir={folder}/{stage}",
    ]
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0 or not output.is_file():
        return {"error": (finished.stderr or finished.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (none found)")
    devices = torch.cuda.device_count()
    table = Table(
        title=f"{torch.cuda.get_device_name(0)} x {devices}: patch {args.patch}, batch {args.batch} per device, {args.steps} steps"
    )
    for column in ("stage", "variant", "devices", "images/s", "peak memory (GiB)"):
        table.add_column(column, justify="left" if column in ("stage", "variant") else "right")
    with tempfile.TemporaryDirectory() as folder:
        for stage in args.stages:
            runs = [(name, flags, 1) for name, flags in VARIANTS.items()]
            if devices > 1:
                runs.append(("bf16-mixed DDP", VARIANTS["bf16-mixed"], devices))
            for name, flags, count in runs:
                result = run(stage, flags, count, args, Path(folder))
                if "error" in result:
                    table.add_row(stage, name, str(count), "failed", result["error"][0][:80])
                else:
                    table.add_row(stage, name, str(count), f"{result['images_per_second']:.1f}", f"{result['peak_memory_gib']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
