"""Model and training-plan summary: ``python -m deblur_diffusion.summary model=... [height=256 width=256]``,
or ``python -m deblur_diffusion.summary experiment=X trainer=ddp trainer.devices=N [trainer.num_nodes=M]``.

Prints the parameters and multiply-accumulates (GMACs = FLOPs / 2, counted by PyTorch's
``FlopCounterMode`` on one inference pass) of every network that runs at inference, broken down by
its top-level blocks; networks that state the counts of a released model (the LDM-BSR prior) show
them beside their own. Then the training plan on the devices asked for
(:mod:`deblur_diffusion.planning`: per phase the steps, patch, global batch, per-device micro-batch,
accumulation and samples, and the passes over the data when the training data is there), or why
those devices cannot train the preset's global batches.
"""

from __future__ import annotations

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deblur_diffusion.cli import config_dir, report_errors, split_datamodule
from deblur_diffusion.errors import DeblurError
from deblur_diffusion.planning import plan_table, training_plan


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(model: nn.Module, inputs: torch.Tensor) -> tuple[dict[str, int], int]:
    """FLOPs of one forward pass: per module path (``net.encoder_level1``) and in total.

    The pass runs on the meta device: shapes propagate and FLOPs are counted, nothing is computed,
    so any size is instant. The model is moved there and left there.
    """
    model.to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs.to("meta"))
    owner = type(model).__name__
    per_module = {}
    for path, counts in counter.get_flop_counts().items():
        if path.startswith(owner + "."):
            per_module[path[len(owner) + 1 :]] = sum(counts.values())
    return per_module, counter.get_total_flops()


def module_flops(flops_by_path: dict[str, int], path: str) -> int:
    """FLOPs of a module; a container that is never called itself (``nn.ModuleList``) gets the sum
    of its items."""
    if path in flops_by_path:
        return flops_by_path[path]
    depth = path.count(".") + 1
    return sum(flops for key, flops in flops_by_path.items() if key.startswith(path + ".") and key.count(".") == depth)


def summary_table(model: nn.Module, height: int, width: int, in_channels: int, batch_size: int = 1) -> Table:
    networks = model.inference_networks()
    in_channels = model.input_channels(in_channels)
    flops_by_path, total_flops = measure(model, torch.zeros(batch_size, in_channels, height, width, device="meta"))
    table = Table(title=f"{type(model).__name__}: parameters and MACs at {batch_size}x{in_channels}x{height}x{width}")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    table.add_column("GMACs", justify="right")
    # The authors' counts per part of the network (the LDM-BSR's autoencoder and UNet).
    released = model.inference_net.released_parameters
    if released:
        table.add_column("released model", justify="right")
    owner_of = {id(module): name for name, module in model.named_modules()}
    total_params = 0
    for name, network in networks.items():
        path = owner_of.get(id(network), name)
        params = count_parameters(network)
        total_params += params
        table.add_row(f"[bold]{name}[/] ({type(network).__name__})", f"{params:,}", f"{flops_by_path.get(path, 0) / 2e9:.3f}")
        for child_name, child in network.named_children():
            child_flops = module_flops(flops_by_path, f"{path}.{child_name}")
            reference = released.get(child_name)
            extra = [f"{reference:,}"] if reference is not None else []
            table.add_row(f"  {child_name}", f"{count_parameters(child):,}", f"{child_flops / 2e9:.3f}", *extra)
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{total_params:,}[/]", f"[bold]{total_flops / 2e9:.2f}[/]")
    return table


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="summary")
@report_errors
def main(cfg: DictConfig) -> None:
    console = Console()
    missing = OmegaConf.missing_keys(cfg.model)
    if missing:
        console.print(f"(no model table: it needs {', '.join(sorted(missing))})", highlight=False)
    else:
        model = instantiate(cfg.model)
        console.print(summary_table(model, cfg.height, cfg.width, cfg.data.in_channels, cfg.batch_size))
    plan = training_plan(cfg)
    try:
        pairs = split_datamodule(cfg, "train").training_pairs()
        caption = ""
    except (DeblurError, InstantiationException) as error:
        # the layout that follows "Expected layout:" is the error's business, not the plan's
        reason = str(error.__cause__ or error).splitlines()[0].removesuffix(" Expected layout:")
        pairs, caption = None, f"passes over the data: not shown ({reason})"
    console.print(plan_table(plan, pairs, caption))


if __name__ == "__main__":
    main()
