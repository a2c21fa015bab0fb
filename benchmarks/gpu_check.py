"""Training speed on one GPU: the papers' networks at paper size under each precision and layout,
with model FLOP utilisation, within a time budget, in one process.

    python benchmarks/gpu_check.py --out results/                            # Restormer, Swintormer, HI-Diff stage two
    python benchmarks/gpu_check.py --out results/ --reference .reference     # and the official architecture code
    python benchmarks/gpu_check.py --out results/ --dry-run                  # every code path, tiny, on the CPU (tests)

On the lent GPU machine, ``benchmarks/gpu_machine.sh`` installs what it lacks and runs this.

Each row trains the stage of ``conf/model/<model>.yaml`` (HI-Diff stage two from scratch:
``model.stage1_ckpt=null``) on the embedded synthetic data through the DataModule, ``--steps``
optimisation steps of ``--batch`` patches of ``--size`` px, timed with CUDA events after
``--warmup`` steps (compilation and cuDNN's autotuning, which is on, happen there); then the same
once more on one batch already on the GPU, so that the data path's share shows. Variants: fp32
(TF32 on or off as ``--tf32`` says, in the label), bf16-mixed, bf16-mixed channels-last (what the
presets run), and bf16-mixed channels-last with ``torch.compile``. MFU is the network's training
FLOPs (3 x the forward FLOPs that ``summary`` counts, per image) times the images per second, over
the device's dense peak for the row's arithmetic (``--peak-tflops``, else the datasheet value of
known GPUs: FP32, TF32 or bf16).

Before any row: the device (name, clocks, memory), ``/dev/shm`` and the settings are written, and
a small network is compiled forward and backward: its time sets the budget of the compiled rows
(inductor's cache goes to ``OUT/inductor``), its failure skips them with the reason. Before each
row, ``results.json`` names it as running, so that a row the machine's time limit kills is
reported. Rows run in order until ``--budget-seconds`` would be passed (the compiled rows last).

``--reference DIR`` adds the official architecture files' training step (benchmarks/train_step.py;
DIR holds the official repositories, fetched, never committed) timed beside this package's network.
The channel attention micro-benchmark times Restormer's MDTA attention at the paper network's level
shapes, through ``F.scaled_dot_product_attention`` against the official matmul-softmax, forward and
backward, in fp32 and bf16 (``deblur_diffusion.models.blocks.set_channel_attention`` picks the form).
Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
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
# train_step.py's names of the networks.
OFFICIAL_NAMES = {"restormer": "restormer", "swintormer": "swintormer", "hidiff_s2": "hidiff"}
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
# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets (SXM boards): (FP32, TF32, bf16).
PEAK_TFLOPS = {"H200": (67.0, 494.0, 989.0), "H100": (67.0, 494.0, 989.0), "A100": (19.5, 156.0, 312.0)}
# Restormer's levels at the paper size for a 256 px patch: (channels, heads, side in pixels).
MDTA_LEVELS = {"level 1": (48, 1, 256), "level 2": (96, 2, 128), "level 3": (192, 4, 64), "latent": (384, 8, 32)}
# The first compiled row's compile time, as a multiple of the small network's (paper-size networks
# have many more graphs to compile); later compiled rows use the measured ones.
COMPILE_SCALE = 20.0
# The time kept for each step after the rows: the channel attention micro-benchmark, and each
# network's official-code ratio (two builds and 2 x 20 timed steps at the paper size).
TAIL_SECONDS = 30.0


class Timer:
    """Elapsed seconds between two marks: CUDA events on a GPU (no host synchronisation in
    between), the wall clock on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.begin.elapsed_time(end) / 1e3
        return time.perf_counter() - self.begin


class StepTimer(L.Callback):
    """Times the optimisation steps after ``warmup`` and counts their images."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.timer, self.started, self.images, self.seconds = warmup, Timer(cuda), False, 0, float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and not self.started:
            self.timer.start()
            self.started = True
        if self.started:
            self.images += batch["lq"].shape[0]

    def on_train_end(self, trainer, pl_module) -> None:
        if self.started:
            self.seconds = self.timer.seconds()


class RepeatedBatch:
    """One batch, already on the device, ``steps`` times: the training step without the data path."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


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


def _fit(model, args, folder: Path, precision: str, accelerator: str, **data) -> StepTimer:
    timer = StepTimer(args.warmup, cuda=not args.dry_run)
    trainer = L.Trainer(
        accelerator=accelerator,
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
    trainer.fit(model, **data)
    return timer


def train_row(network: str, variant: str, args, folder: Path) -> dict:
    precision, channels_last, compiled = VARIANTS[variant]
    cfg = compose_row(network, precision, channels_last, compiled, args, folder)
    L.seed_everything(0)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    _, forward_flops = measure(instantiate(cfg.model.net), torch.zeros(1, model.net.input_channels, args.size, args.size))
    device = "cpu" if args.dry_run else "cuda"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fed = _fit(model, args, folder, precision, cfg.trainer.accelerator, datamodule=datamodule)
    # The same steps on one batch already on the device (a new model: the same work from the start).
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    L.seed_everything(0)
    fixed = _fit(
        instantiate(cfg.model), args, folder, precision, cfg.trainer.accelerator, train_dataloaders=RepeatedBatch(batch, args.steps)
    )
    arithmetic = "bf16" if precision.startswith("bf16") else ("tf32" if args.tf32 else "fp32")
    row = {
        "network": network,
        "variant": variant_label(variant, args.tf32),
        "images_per_second": fed.images / fed.seconds if fed.images else float("nan"),
        "fixed_batch_images_per_second": fixed.images / fixed.seconds if fixed.images else float("nan"),
        "timed_steps": args.steps - args.warmup,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "training_gflops_per_image": 3 * forward_flops / 1e9,
        "arithmetic": arithmetic,
    }
    peak = args.peak_tflops or known_peak(arithmetic)
    if peak:
        row["peak_tflops"] = peak
        row["mfu"] = row["training_gflops_per_image"] * row["images_per_second"] / (peak * 1e3)
    return row


def variant_label(variant: str, tf32: bool) -> str:
    return f"fp32 ({'TF32' if tf32 else 'IEEE'})" if variant == "fp32" else variant


def known_peak(arithmetic: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    column = {"fp32": 0, "tf32": 1, "bf16": 2}[arithmetic]
    return next((peaks[column] for model, peaks in PEAK_TFLOPS.items() if model in name), None)


def official_ratio(network: str, args) -> dict:
    """The official architecture's training step against this package's (train_step.py's timing)."""
    from train_step import build_models, prepare_steps, time_steps

    inputs, models = build_models(OFFICIAL_NAMES[network], args.reference, args.size, args.batch, tiny=args.dry_run)
    device = torch.device("cpu" if args.dry_run else "cuda")
    steps = prepare_steps({label: models[label] for label in ("official", "package")}, inputs, device)
    seconds = time_steps(steps, args.official_repeats, device)
    medians = {label: statistics.median(times) for label, times in seconds.items()}
    return {
        "network": network,
        "official_seconds": medians["official"],
        "package_seconds": medians["package"],
        "package_speed_vs_official": medians["official"] / medians["package"],
    }


def _attention(form: str) -> Callable:
    def attend(q, k, v):
        if form == "matmul":
            return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)

    return attend


def channel_attention(args) -> list[dict]:
    """MDTA's attention at each level of the paper network (q, k, v: batch x heads x channels per
    head x pixels), SDPA against matmul-softmax, forward and backward, fp32 and bf16."""
    device = "cpu" if args.dry_run else "cuda"
    levels = {name: (channels, heads, 8 if args.dry_run else side) for name, (channels, heads, side) in MDTA_LEVELS.items()}
    repeats = 2 if args.dry_run else 20
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for level, (channels, heads, side) in levels.items():
            shape = (args.batch, heads, channels // heads, side * side)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            row = {"level": level, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
            for form in ("sdpa", "matmul"):
                attend = _attention(form)
                timer = Timer(cuda=device == "cuda")
                for _ in range(2):  # warm-up (kernel choice)
                    attend(q, k, v).sum().backward()
                timer.start()
                for _ in range(repeats):
                    attend(q, k, v).sum().backward()
                row[f"{form}_ms"] = timer.seconds() / repeats * 1e3
            row["matmul_over_sdpa"] = row["matmul_ms"] / row["sdpa_ms"]
            rows.append(row)
    return rows


def compile_smoke_test(args) -> dict:
    """Compiles a small network forward and backward: whether compiling works here, and how long it takes."""
    device = "cpu" if args.dry_run else "cuda"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(16, 3, 3, padding=1)).to(device)
    compiled = torch.compile(net)
    began = time.monotonic()
    try:
        compiled(torch.rand(2, 3, 32, 32, device=device)).mean().backward()
    except Exception as error:  # compiling fails on some machines (no compiler, no Triton)
        return {"ok": False, "seconds": time.monotonic() - began, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return {"ok": True, "seconds": time.monotonic() - began}


def environment(args) -> dict:
    """The device and the settings the rows ran under."""
    record = {
        "torch": torch.__version__,
        "tf32": args.tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "dev_shm_gib": shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else None,
    }
    if args.dry_run or not torch.cuda.is_available():
        return {**record, "device": "cpu (dry run)"}
    properties = torch.cuda.get_device_properties(0)
    record.update(device=properties.name, memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count)
    query = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"
    try:
        answer = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        )
        record["nvidia_smi"] = dict(
            zip(query.split(","), (field.strip() for field in answer.stdout.splitlines()[0].split(",")), strict=False)
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        record["nvidia_smi"] = None
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (at least 50 are timed by default)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 for float32 matmuls and convolutions")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for the rows' arithmetic")
    parser.add_argument("--reference", type=Path, default=None, help="folder with the official repositories (train_step.py)")
    parser.add_argument("--official-repeats", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="tiny networks on the CPU: checks every code path, measures nothing")
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.batch, args.steps, args.warmup, args.workers, args.official_repeats = 32, 2, 3, 1, 0, 2
        # Inductor takes minutes on a CPU: the dry run compiles with the eager backend, which runs
        # the same path (Dynamo's tracing, the compiled modules) without generating code.
        torch.compile = functools.partial(torch.compile, backend="eager")
        torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="eager")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (none found); --dry-run checks the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.out.resolve() / "inductor"))
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    start = time.monotonic()
    results = {"environment": environment(args), "rows": [], "failed": [], "skipped": [], "official": [], "channel_attention": []}
    results["compile_smoke_test"] = smoke = compile_smoke_test(args)
    write_results(args, results, start)

    eager = [(n, v) for v in VARIANTS if "compile" not in v for n in args.networks]
    compiled = [(n, v) for v in VARIANTS if "compile" in v for n in args.networks]
    if not smoke["ok"]:
        results["skipped"] += [f"{n} {v} (compiling failed: {smoke['error']})" for n, v in compiled]
        compiled = []
    durations: dict[str, float] = {}
    compile_seconds = smoke["seconds"] * COMPILE_SCALE
    # What runs after the rows (the attention micro-benchmark, the official-code ratios) keeps its share.
    rows_budget = args.budget_seconds - (0 if args.dry_run else TAIL_SECONDS * (1 + len(args.networks) * (args.reference is not None)))
    for network, variant in eager + compiled:
        expected = durations.get(network, 0.0) + (compile_seconds if "compile" in variant else 0.0)
        if time.monotonic() - start + expected > rows_budget:
            results["skipped"].append(f"{network} {variant} (time budget)")
            continue
        results["running"] = f"{network} {variant}"
        write_results(args, results, start)  # a row killed by the machine's time limit is named there
        began = time.monotonic()
        try:
            results["rows"].append(train_row(network, variant, args, args.out / "runs"))
        except Exception as error:  # a failing row is reported and the others still run
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            results["failed"].append({"network": network, "variant": variant, "error": message})
        took = time.monotonic() - began
        if "compile" in variant:
            compile_seconds = max(0.0, took - durations.get(network, 0.0))
        else:
            durations[network] = max(durations.get(network, 0.0), took)
        results.pop("running")
        write_results(args, results, start)
    results["running"] = "channel attention"
    write_results(args, results, start)
    try:
        results["channel_attention"] = channel_attention(args)
    except Exception as error:  # reported; the official ratios still run
        results["failed"].append({"network": "restormer", "variant": "channel attention", "error": f"{type(error).__name__}: {error}"})
    if args.reference is not None:
        for network in args.networks:
            if time.monotonic() - start + (0 if args.dry_run else TAIL_SECONDS) > args.budget_seconds:
                results["skipped"].append(f"official {network} (time budget)")
                continue
            results["running"] = f"official {network}"
            write_results(args, results, start)
            try:
                results["official"].append(official_ratio(network, args))
            except Exception as error:  # a missing file or another network: reported, the rest stands
                results["failed"].append({"network": network, "variant": "official code", "error": f"{type(error).__name__}: {error}"})
    results.pop("running", None)
    tables, notes = write_results(args, results, start)
    console = Console(width=140)
    console.print(*tables)
    for note in notes:
        console.print(note, highlight=False)


def write_results(args, results: dict, start: float) -> tuple[list[Table], list[str]]:
    """Writes results.json and results.md to ``args.out``; returns the tables and their notes."""
    record = {
        **results,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "seconds": time.monotonic() - start,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    device = results["environment"]["device"]
    title = f"{device}: {args.batch} x {args.size} px patches, {args.steps - args.warmup} timed steps"
    columns = ("network", "variant", "images/s", "fixed batch images/s", "peak memory (GiB)", "training GFLOPs/image", "MFU")
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("network", "variant") else "right")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in results["rows"]:
        cells = [
            row["network"],
            row["variant"],
            f"{row['images_per_second']:.1f}",
            f"{row['fixed_batch_images_per_second']:.1f}",
            f"{row['peak_memory_gib']:.2f}",
            f"{row['training_gflops_per_image']:.0f}",
            f"{row['mfu']:.1%} of {row['peak_tflops']:.0f} TFLOP/s" if "mfu" in row else "",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    attention = Table(title="Channel attention (MDTA), forward + backward, ms")
    attention_columns = ("level", "dtype", "q/k/v shape", "SDPA", "matmul-softmax", "matmul / SDPA")
    for column in attention_columns:
        attention.add_column(column, justify="left" if column in ("level", "dtype", "q/k/v shape") else "right")
    attention_lines = ["| " + " | ".join(attention_columns) + " |", "|" + "---|" * len(attention_columns)]
    for row in results["channel_attention"]:
        cells = [
            row["level"],
            row["dtype"],
            "x".join(map(str, row["shape"])),
            f"{row['sdpa_ms']:.3f}",
            f"{row['matmul_ms']:.3f}",
            f"{row['matmul_over_sdpa']:.2f}",
        ]
        attention.add_row(*cells)
        attention_lines.append("| " + " | ".join(cells) + " |")
    notes = [f"failed: {item['network']} {item['variant']}: {item['error']}" for item in results["failed"]]
    notes += [f"skipped: {', '.join(results['skipped'])}"] if results["skipped"] else []
    notes += [f"running: {results['running']}"] if "running" in results else []
    notes += [
        f"official code: {r['network']}: this package {r['package_speed_vs_official']:.2f}x the official step speed"
        for r in results["official"]
    ]
    smoke = results.get("compile_smoke_test", {})
    notes += [f"compile smoke test: {'ok' if smoke.get('ok') else smoke.get('error')} in {smoke.get('seconds', 0):.1f} s"] if smoke else []
    (args.out / "results.md").write_text("\n".join([*lines, "", *attention_lines, "", *notes]) + "\n")
    return [table, attention], notes


if __name__ == "__main__":
    main()
