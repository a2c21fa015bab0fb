"""Training speed on one GPU: the papers' networks at paper size under each precision and layout,
with model FLOP utilisation, within a time budget, in one process.

    python benchmarks/gpu_check.py --out results/                      # Restormer, Swintormer, HI-Diff stage two
    python benchmarks/gpu_check.py --out results/ --reference ~/src    # and the official architecture code
    python benchmarks/gpu_check.py --out results/ --dry-run            # the eager rows, tiny, on the CPU (tests)

On the lent GPU machine, ``benchmarks/gpu_machine.sh`` installs what it lacks and runs this.

Each row trains the stage of ``conf/model/<model>.yaml`` (HI-Diff stage two from scratch:
``model.stage1_ckpt=null``) on the embedded synthetic data through the DataModule, ``--steps``
optimisation steps of ``--batch`` patches of ``--size`` px, and times the steps after
``--warmup`` (compilation and cuDNN's autotuning happen there). Variants: fp32, bf16-mixed, bf16-mixed
channels-last (what the presets run), and bf16-mixed channels-last with ``torch.compile``. MFU is the
network's training FLOPs (3 x the forward FLOPs that ``summary`` counts, per image) times the images
per second, over the device's dense peak for the row's precision (``--peak-tflops``, else the
datasheet value of known GPUs). With ``--reference``, the official architecture files' training
step (benchmarks/train_step.py) is timed beside this package's network for a ratio.

Rows run in order until ``--budget-seconds`` would be passed (the compile rows, slowest to
start, come last); the skipped ones are listed. Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table

from deblur_diffusion.cli import config_dir
from deblur_diffusion.summary import measure

NETWORKS = {
    "restormer": ["model=restormer"],
    "swintormer": ["model=swintormer"],
    "hidiff_s2": ["model=hidiff_s2", "model.stage1_ckpt=null"],
}
# --dry-run: each network at a size that trains in seconds on a CPU.
TINY = {
    "restormer": ["model=restormer_tiny"],
    "swintormer": [
        "model.net.dim=8",
        "model.net.num_blocks=[1,1,1,1]",
        "model.net.num_refinement_blocks=1",
        "model.net.heads=[1,1,1,1]",
        "model.net.window_size=4",
    ],
    "hidiff_s2": [
        "model.net.transformer.dim=8",
        "model.net.transformer.num_blocks=[1,1,1,1]",
        "model.net.transformer.num_refinement_blocks=1",
        "model.net.transformer.heads=[1,1,1,1]",
        "model.net.transformer.embed_dim=8",
        "model.net.denoiser.in_channel=32",
        "model.net.denoiser.out_channel=32",
        "model.net.denoiser.inner_channel=16",
        "model.latent_encoder.embed_dim=8",
    ],
}
VARIANTS = {
    "fp32": ("32-true", False, False),
    "bf16-mixed": ("bf16-mixed", False, False),
    "bf16-mixed channels-last": ("bf16-mixed", True, False),
    "bf16-mixed channels-last compile": ("bf16-mixed", True, True),
}
# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets (SXM boards): (TF32, bf16). The
# fp32 rows are divided by the TF32 peak: cuDNN runs float32 convolutions in TF32 by default.
PEAK_TFLOPS = {"H200": (494.0, 989.0), "H100": (494.0, 989.0), "A100": (156.0, 312.0)}


class StepTimer(L.Callback):
    """Times the optimisation steps after ``warmup`` and records the peak device memory."""

    def __init__(self, warmup: int):
        self.warmup, self.started, self.images, self.seconds = warmup, None, 0, float("nan")

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self._sync(trainer)
            self.started = time.perf_counter()
        if self.started is not None:
            self.images += batch["lq"].shape[0]

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(trainer)
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started


def compose_row(network: str, precision: str, channels_last: bool, compiled: bool, args, folder: Path):
    size_overrides = TINY[network] if args.dry_run else []
    overrides = [
        *NETWORKS[network],
        *size_overrides,
        "data=synthetic",
        f"data.train.image_size={args.size}",
        f"data.patch_schedule=[[0,{args.size},{args.batch}]]",
        f"data.num_workers={args.workers}",
        f"model.channels_last={str(channels_last).lower()}",
        f"model.compile_network={str(compiled).lower()}",
        "model.ema_decay=null",
        f"trainer.precision={precision}",
        f"trainer.accelerator={'cpu' if args.dry_run else 'gpu'}",
        "trainer.devices=1",
        f"trainer.max_steps={args.steps}",
        "trainer.accumulate_grad_batches=1",
        f"paths.root_dir={folder}",
        f"paths.output_dir={folder}",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def train_row(network: str, variant: str, args, folder: Path) -> dict:
    precision, channels_last, compiled = VARIANTS[variant]
    cfg = compose_row(network, precision, channels_last, compiled, args, folder)
    L.seed_everything(0)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    net = model.net
    input_channels = net.input_channels
    flops_model = instantiate(cfg.model.net)
    _, forward_flops = measure(flops_model, torch.zeros(1, input_channels, args.size, args.size))
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=precision,
        max_steps=args.steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=folder,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=datamodule)
    images_per_second = timer.images / timer.seconds if timer.images else float("nan")
    row = {
        "network": network,
        "variant": variant,
        "images_per_second": images_per_second,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "training_gflops_per_image": 3 * forward_flops / 1e9,
    }
    peak = args.peak_tflops or known_peak(precision)
    if peak:
        row["mfu"] = row["training_gflops_per_image"] * images_per_second / (peak * 1e3)
    return row


def known_peak(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for model, (tf32, bf16) in PEAK_TFLOPS.items():
        if model in name:
            return bf16 if precision.startswith("bf16") else tf32
    return None


def official_ratio(network: str, args) -> dict:
    """The official architecture's training step against this package's (train_step.py's timing)."""
    from train_step import build_models, time_steps

    name = "hidiff" if network == "hidiff_s2" else network
    inputs, models = build_models(name, args.reference, args.size, args.batch)
    device = torch.device("cpu" if args.dry_run else "cuda")
    medians = time_steps({label: models[label] for label in ("official", "package")}, inputs, 5, device)
    return {
        "network": network,
        "official_seconds": medians["official"],
        "package_seconds": medians["package"],
        "package_speed_vs_official": medians["official"] / medians["package"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for the rows' precision")
    parser.add_argument("--reference", type=Path, default=None, help="folder with the official repositories (train_step.py)")
    parser.add_argument("--dry-run", action="store_true", help="tiny networks on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.batch, args.steps, args.warmup, args.workers = 32, 2, 3, 1, 0
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (none found); --dry-run checks the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows, skipped, failed = [], [], []
    # Cheap rows first: every network's eager variants, then the compiled ones.
    eager = [(n, v) for v in VARIANTS if "compile" not in v for n in args.networks]
    # Inductor on a CPU takes minutes: a dry run leaves the compiled rows out.
    compiled = [] if args.dry_run else [(n, v) for v in VARIANTS if "compile" in v for n in args.networks]
    order = eager + compiled
    durations = {}
    for network, variant in order:
        expected = 3 * durations.get(network, 0.0) if "compile" in variant else durations.get(network, 0.0)
        if time.monotonic() - start + expected > args.budget_seconds:
            skipped.append(f"{network} {variant}")
            continue
        began = time.monotonic()
        try:
            rows.append(train_row(network, variant, args, args.out / "runs"))
        except Exception as error:  # a failing row is reported and the others still run
            failed.append({"network": network, "variant": variant, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
        durations[network] = max(durations.get(network, 0.0), time.monotonic() - began)
        # After every row: a run stopped by the machine's time limit keeps what it measured.
        write_results(args, rows, failed, skipped, [], start)
    ratios = [official_ratio(network, args) for network in args.networks] if args.reference is not None else []
    table, notes = write_results(args, rows, failed, skipped, ratios, start)
    Console().print(table, *notes)


def write_results(args, rows: list, failed: list, skipped: list, ratios: list, start: float) -> tuple[Table, list[str]]:
    """Writes results.json and results.md to ``args.out``; returns the table and its notes."""
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    record = {
        "device": device,
        "torch": torch.__version__,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "failed": failed,
        "skipped": skipped,
        "official": ratios,
        "seconds": time.monotonic() - start,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    table = Table(title=f"{device}: {args.batch} x {args.size} px patches, {args.steps - args.warmup} timed steps")
    for column in ("network", "variant", "images/s", "peak memory (GiB)", "training GFLOPs/image", "MFU"):
        table.add_column(column, justify="left" if column in ("network", "variant") else "right")
    lines = ["| network | variant | images/s | peak memory (GiB) | training GFLOPs/image | MFU |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [
            row["network"],
            row["variant"],
            f"{row['images_per_second']:.1f}",
            f"{row['peak_memory_gib']:.2f}",
            f"{row['training_gflops_per_image']:.0f}",
            f"{row['mfu']:.1%}" if "mfu" in row else "",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"failed: {item['network']} {item['variant']}: {item['error']}" for item in failed]
    notes += [f"skipped (time budget): {', '.join(skipped)}"] if skipped else []
    notes += [f"official code: {r['network']}: this package {r['package_speed_vs_official']:.2f}x the official step speed" for r in ratios]
    (args.out / "results.md").write_text("\n".join([*lines, "", *notes]) + "\n")
    return table, notes


if __name__ == "__main__":
    main()
