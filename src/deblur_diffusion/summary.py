"""Model summary: ``python -m deblur_diffusion.summary model=... [height=256 width=256]``.

Prints the parameters and multiply-accumulates (GMACs = FLOPs / 2, counted by PyTorch's
``FlopCounterMode`` on one inference pass) of every network that runs at inference, broken down by
its top-level blocks; networks that state the counts of a released model (the LDM-BSR prior) show
them beside their own.
"""

from __future__ import annotations

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deblur_diffusion.cli import config_dir, report_errors, require_complete


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
    require_complete(cfg.model)
    model = instantiate(cfg.model)
    Console().print(summary_table(model, cfg.height, cfg.width, cfg.data.in_channels, cfg.batch_size))


if __name__ == "__main__":
    main()
