"""Training-step time of each network at its paper configuration, side by side with the official code.

    python benchmarks/train_step.py                                   # this package only
    python benchmarks/train_step.py --reference ~/src                 # and the official files
    python benchmarks/train_step.py --device cuda --batch 8 --size 256
    python benchmarks/train_step.py --inference --models swintormer --size 512   # forward only
    python benchmarks/train_step.py --reference ~/src --profile       # and where each row's step goes

``--reference DIR`` names a folder holding checkouts of the official repositories (this repository
does not ship them):

* ``DIR/Restormer/basicsr/models/archs/restormer_arch.py`` (swz30/Restormer)
* ``DIR/HI-Diff/hi_diff/archs/Transformer_arch.py`` (zhengchen1999/HI-Diff)
* ``DIR/swintormer/basicsr/archs/Swintormer_arch.py`` (bnm6900030/swintormer)

Each file is imported on its own, with BasicSR's registry replaced by a no-op decorator and, for
Swintormer, fairscale's ``checkpoint_wrapper`` by activation checkpointing through
``torch.utils.checkpoint`` (the official code checkpoints every level but the first, as released),
and once more by the identity (the same network without checkpointing, a like-for-like reference
for this package's default, which does not checkpoint).
The official network gets this package's weights, so both compute the same function, and the
outputs are compared before timing.

A step is forward, L1 loss, backward and an AdamW step on one batch; with ``--inference``, one
forward pass in evaluation mode without gradients. The rows of a model are timed
in turns (official, package, official, ...) in one process, and the median is reported, so that
ratios are measured under the same load. On a CPU, compare ratios only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.checkpoint import checkpoint

from deblur_diffusion.models import PriorGuidedRestormer, Restormer, Swintormer

# HI-Diff's GoPro stage-two transformer (options/train/GoPro_S2.yml).
HIDIFF_GOPRO = {"dim": 48, "num_blocks": [3, 5, 6, 6], "num_refinement_blocks": 4, "heads": [1, 2, 4, 8], "embed_dim": 64, "group": 4}
PRIOR_TOKENS = (16, 256)

# The package's network in the channels-last layout, as the training presets run it (model.channels_last).
CHANNELS_LAST = "package, channels-last (the presets)"

REFERENCE_FILES = {
    "restormer": "Restormer/basicsr/models/archs/restormer_arch.py",
    "hidiff": "HI-Diff/hi_diff/archs/Transformer_arch.py",
    "swintormer": "swintormer/basicsr/archs/Swintormer_arch.py",
}


def _stub_module(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _checkpoint_wrapper(module: nn.Module, **_) -> nn.Module:
    """fairscale's checkpoint_wrapper as the official Swintormer uses it: the module's forward is
    recomputed in the backward pass; its parameter names are unchanged."""
    forward = module.forward

    def checkpointed(*inputs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *inputs, use_reentrant=False)
        return forward(*inputs)

    module.forward = checkpointed
    return module


def import_reference(path: Path, checkpointing: bool = True) -> types.ModuleType:
    """Imports one official architecture file with its framework imports stubbed out; without
    ``checkpointing``, fairscale's wrapper is the identity (the official network without it)."""
    registry = types.SimpleNamespace(register=lambda *args, **kwargs: lambda obj: obj)
    for package in ("basicsr", "basicsr.utils", "fairscale"):
        sys.modules.setdefault(package, types.ModuleType(package))
    _stub_module("basicsr.utils.registry", ARCH_REGISTRY=registry)
    _stub_module("fairscale.nn", checkpoint_wrapper=_checkpoint_wrapper if checkpointing else lambda module, **_: module)
    spec = importlib.util.spec_from_file_location(f"reference_{path.stem}_{checkpointing}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --tiny: each network at a size that steps in a fraction of a second on a CPU (gpu_check's dry run).
TINY = {
    "restormer": {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]},
    "hidiff": {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1], "embed_dim": 64, "group": 4},
    "swintormer": {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1], "window_size": 4},
}


class NotTheSameNetworkError(ValueError):
    """The official network and this package's do not compute the same function."""


def build_models(name: str, reference_dir: Path | None, size: int, batch: int, tiny: bool = False):
    """(inputs, {label: (model, forward)}) for one network (``tiny``: the TINY configuration)."""
    generator = torch.Generator().manual_seed(0)
    sizes = TINY[name] if tiny else {}
    if name == "restormer":
        inputs = (torch.rand(batch, 3, size, size, generator=generator),)
        package = {"package": Restormer(**sizes), CHANNELS_LAST: Restormer(**sizes)}
        official_class, official_args = "Restormer", sizes
    elif name == "hidiff":
        arguments = sizes or HIDIFF_GOPRO
        inputs = (torch.rand(batch, 3, size, size, generator=generator), torch.rand(batch, *PRIOR_TOKENS, generator=generator))
        package = {"package": PriorGuidedRestormer(**arguments), CHANNELS_LAST: PriorGuidedRestormer(**arguments)}
        official_class, official_args = "Transformer", arguments
    else:
        inputs = (torch.rand(batch, 6, size, size, generator=generator),)
        package = {
            "package": Swintormer(**sizes),
            CHANNELS_LAST: Swintormer(**sizes),
            "package, official checkpointing": Swintormer(**sizes, checkpoint_levels="official"),
        }
        official_class, official_args = "Swintormer", sizes
    state = package["package"].state_dict()
    for model in package.values():
        model.load_state_dict(state)
    package[CHANNELS_LAST].to(memory_format=torch.channels_last)
    models = dict(package)
    if reference_dir is not None:
        variants = {"official": True, "official without its checkpointing": False} if name == "swintormer" else {"official": True}
        officials = {}
        for label, checkpointing in variants.items():
            module = import_reference(reference_dir / REFERENCE_FILES[name], checkpointing)
            official = getattr(module, official_class)(**official_args)
            missing, unexpected = official.load_state_dict(state, strict=False)
            if unexpected or [key for key in missing if not key.endswith(("relative_coords_table", "relative_position_index"))]:
                raise NotTheSameNetworkError(
                    f"{name}: the official network does not take this package's weights: {missing[:5]} {unexpected[:5]}"
                )
            officials[label] = official
        models = {**officials, **models}
    return inputs, models


def prepare_steps(
    models: dict[str, nn.Module], inputs: tuple, device: torch.device, inference: bool = False
) -> dict[str, Callable[[], None]]:
    """One step (or forward) per model, after checking that every model computes the same output
    and running each step once."""
    inputs = tuple(t.to(device) for t in inputs)
    target = torch.rand_like(inputs[0][:, :3])
    steps: dict[str, Callable[[], None]] = {}
    layout = {label: torch.channels_last if label == CHANNELS_LAST else torch.contiguous_format for label in models}
    model_inputs = {label: tuple(t.contiguous(memory_format=layout[label]) if t.ndim == 4 else t for t in inputs) for label in models}
    for label, model in models.items():
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer, inputs=model_inputs[label]) -> None:
            optimizer.zero_grad(set_to_none=True)
            (model(*inputs) - target).abs().mean().backward()
            optimizer.step()

        @torch.inference_mode()
        def forward(model=model, inputs=model_inputs[label]) -> None:
            model(*inputs)

        model.train(not inference)
        steps[label] = forward if inference else step
    # Compared in IEEE float32: TF32 (a GPU's default for convolutions) alone moves outputs by ~1e-3.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            outputs = {label: model(*model_inputs[label]) for label, model in models.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    first = next(iter(outputs.values()))
    for label, output in outputs.items():
        difference = (output - first).abs().max().item()
        if difference > 1e-4:
            raise NotTheSameNetworkError(f"{label} differs from {next(iter(outputs))} by {difference}: not the same network")
    for step in steps.values():  # warm-up
        step()
    return steps


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[label].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=None, help="folder with the official repositories")
    parser.add_argument("--models", nargs="+", default=["restormer", "hidiff", "swintormer"], choices=list(REFERENCE_FILES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inference", action="store_true", help="time one forward pass without gradients instead of a step")
    parser.add_argument("--profile", action="store_true", help="and where one step of each row spends its time (torch.profiler)")
    args = parser.parse_args()
    if args.profile and args.device != "cpu":
        parser.error("--profile measures time spent on the CPU: use it with --device cpu")
    profiles = []
    device = torch.device(args.device)
    work = "Inference" if args.inference else "Training step"
    table = Table(title=f"{work}, batch {args.batch} x {args.size}^2, {device.type}, median of {args.repeats}")
    for column in ("network", "code", "seconds", "min - max", "official / this row", "official without checkpointing / this row"):
        table.add_column(column, justify="left" if column in ("network", "code") else "right")
    for name in args.models:
        inputs, models = build_models(name, args.reference, args.size, args.batch)
        steps = prepare_steps(models, inputs, device, args.inference)
        seconds = time_steps(steps, args.repeats, device)
        medians = {label: statistics.median(times) for label, times in seconds.items()}
        for label, median in medians.items():
            ratios = [
                f"{medians[reference] / median:.2f}x" if reference in medians else ""
                for reference in ("official", "official without its checkpointing")
            ]
            spread = f"{min(seconds[label]):.3f} - {max(seconds[label]):.3f}"
            table.add_row(name if label == next(iter(medians)) else "", label, f"{median:.3f}", spread, *ratios)
        table.add_section()
        if args.profile:
            profiles.append((name, profile_steps(steps)))
    console = Console(width=160)
    console.print(table)
    for name, profile in profiles:
        console.print(profile_table(name, profile))


# Where a step's time goes, by the operators torch.profiler names (their own time, children excluded).
CATEGORIES = {
    "convolutions": ("conv",),
    "matrix products": ("mm", "matmul", "linear", "scaled_dot_product", "attention"),
    "copies and layout": ("copy", "clone", "contiguous", "cat", "pad", "roll", "index", "reflection", "stack", "_to_"),
    "optimizer": ("foreach", "adam", "lerp", "addcdiv", "addcmul"),
    "normalisation and softmax": ("norm", "softmax", "var", "mean", "std"),
    "element-wise": ("mul", "add", "sub", "div", "gelu", "sigmoid", "relu", "pow", "sqrt", "abs", "sign", "neg", "exp", "fill", "zero"),
}
SHARED_KERNELS = ("convolutions", "matrix products")


def category(operator: str) -> str:
    name = operator.removeprefix("aten::").lower()
    return next((label for label, words in CATEGORIES.items() if any(word in name for word in words)), "other")


def profile_steps(steps: dict[str, Callable[[], None]]) -> dict[str, dict[str, float]]:
    """Seconds per category of one step of each model, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    found = {}
    for label, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
        totals: dict[str, float] = {}
        for event in profiler.key_averages():
            group = category(event.key)
            totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
        found[label] = totals
    return found


def profile_table(name: str, profile: dict[str, dict[str, float]]) -> Table:
    """Seconds per category and model; the caption bounds the speed-up over the official code that
    the operators both codes run through the same kernels (convolutions, matrix products) leave."""
    labels = list(profile)
    table = Table(title=f"{name}: where one step's time goes (torch.profiler, seconds, the profiler's own cost included)")
    table.add_column("operators")
    for label in labels:
        table.add_column(label, justify="right")
    for group in [*CATEGORIES, "other"]:
        table.add_row(group, *(f"{profile[label].get(group, 0.0):.3f}" for label in labels))
    table.add_row("[bold]total[/]", *(f"[bold]{sum(profile[label].values()):.3f}[/]" for label in labels))
    if "official" in profile and CHANNELS_LAST in profile:
        shared = sum(profile[CHANNELS_LAST].get(group, 0.0) for group in SHARED_KERNELS)
        table.caption = (
            f"the official step / the package's (channels-last) {' and '.join(SHARED_KERNELS)}: "
            f"{sum(profile['official'].values()) / shared:.2f}x, the most that removing everything else would give"
        )
    return table


if __name__ == "__main__":
    main()
