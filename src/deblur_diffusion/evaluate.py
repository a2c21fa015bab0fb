"""Evaluation with the papers' protocols: ``python -m deblur_diffusion.evaluate ckpt=... data=...``.

Restores every pair of a dataset split and scores it:

* ``standard`` (GoPro, HIDE, synthetic, folders): PSNR, SSIM, MAE and LPIPS on RGB in [0, 1];
* ``dpdd``: the same, reported for the indoor and outdoor scenes and combined;
* ``realblur``: PSNR and SSIM after intensity matching and ECC alignment, over the warp's valid
  pixels (MAE and LPIPS on the unaligned images).

Writes ``per_image.csv``, ``summary.json`` and ``summary.md`` (and with ``save_images=true`` the
restored images, with the input's bit depth and file name) to the run folder and prints the table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import track
from rich.table import Table
from rich.text import Text

from deblur_diffusion.cli import config_dir, report_errors, require_complete, show
from deblur_diffusion.data.folders import DPDD, PairedFiles, RealBlur
from deblur_diffusion.data.io import image_bit_depth, write_image
from deblur_diffusion.data.patches import WholeImages
from deblur_diffusion.data.sources import PairSource
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.metrics import LPIPS, LPIPSUnavailable, align_realblur, dpdd_group, mae, psnr, ssim
from deblur_diffusion.pretrained import restorer_from_config

PROTOCOLS = ("standard", "dpdd", "realblur")
METRICS = ("psnr", "ssim", "mae", "lpips")


def resolve_protocol(protocol: str, source: PairSource) -> str:
    if protocol == "auto":
        if isinstance(source, DPDD):
            return "dpdd"
        return "realblur" if isinstance(source, RealBlur) else "standard"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be auto or one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def input_bit_depth(source: PairSource, index: int) -> int:
    """The bit depth of the pair's blurry file (8 for generated data)."""
    return image_bit_depth(source.inputs[index][0]) if isinstance(source, PairedFiles) else 8


def output_name(source: PairSource, index: int) -> str:
    suffix = source.inputs[index][0].suffix if isinstance(source, PairedFiles) else ".png"
    return source.name(index) + suffix


def quantized(image: torch.Tensor, bit_depth: int) -> torch.Tensor:
    scale = float(2**bit_depth - 1)
    return torch.round(image * scale) / scale


def score(restored: torch.Tensor, target: torch.Tensor, protocol: str, lpips: LPIPS | None) -> dict[str, float]:
    """The metrics of one restored (1, 3, H, W) image against its target."""
    row = {"mae": mae(restored, target).item()}
    if protocol == "realblur":
        aligned, masked_target, mask = align_realblur(
            restored[0].permute(1, 2, 0).cpu().numpy(), target[0].permute(1, 2, 0).cpu().numpy()
        )
        aligned, masked_target, mask = (torch.from_numpy(a).permute(2, 0, 1)[None] for a in (aligned, masked_target, mask))
        row["psnr"] = psnr(aligned, masked_target, mask).item()
        row["ssim"] = ssim(aligned, masked_target, mask).item()
    else:
        row["psnr"] = psnr(restored, target).item()
        row["ssim"] = ssim(restored, target).item()
    if lpips is not None:
        row["lpips"] = lpips(restored, target).item()
    return row


def summarise(rows: list[dict], protocol: str) -> dict[str, dict[str, float]]:
    """Mean metrics per group (indoor / outdoor / combined for DPDD, all otherwise)."""
    groups = {"combined" if protocol == "dpdd" else "all": rows}
    if protocol == "dpdd":
        groups = {
            "indoor": [r for r in rows if r["group"] == "indoor"],
            "outdoor": [r for r in rows if r["group"] == "outdoor"],
            **groups,
        }
    summary = {}
    for name, members in groups.items():
        if members:
            summary[name] = {"images": len(members)} | {
                metric: float(np.mean([r[metric] for r in members])) for metric in METRICS if metric in members[0]
            }
    return summary


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("group", "images", "PSNR (dB)", "SSIM", "MAE", "LPIPS"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for group, values in summary.items():
        lpips = f"{values['lpips']:.4f}" if "lpips" in values else "n/a"
        table.add_row(group, str(values["images"]), f"{values['psnr']:.2f}", f"{values['ssim']:.4f}", f"{values['mae']:.4f}", lpips)
    return table


def markdown(summary: dict) -> str:
    lines = ["| group | images | PSNR (dB) | SSIM | MAE | LPIPS |", "|---|---|---|---|---|---|"]
    for group, v in summary.items():
        lpips = f"{v['lpips']:.4f}" if "lpips" in v else "n/a"
        lines.append(f"| {group} | {v['images']} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['mae']:.4f} | {lpips} |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig) -> dict:
    """Runs the evaluation of ``cfg``; returns the summary (also written to ``cfg.output_dir``)."""
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {cfg.split!r}")
    require_complete(cfg, unused=("model.", *(f"data.{split}." for split in ("train", "val", "test") if split != cfg.split)))
    if cfg.data.get(cfg.split) is None:
        raise ConfigError(f"the data config has no {cfg.split} split (data.{cfg.split} is null); try split=val")
    torch.manual_seed(cfg.seed)
    source: PairSource = instantiate(cfg.data[cfg.split])
    protocol = resolve_protocol(cfg.protocol, source)
    restorer = restorer_from_config(cfg)
    if source.in_channels != restorer.input_channels:
        raise ConfigError(
            f"the model reads {restorer.input_channels} input channels but data.{cfg.split} gives {source.in_channels}; "
            "pick the matching data config (e.g. data=dpdd_dual for dual-pixel models)"
        )
    console = Console()
    lpips, lpips_note = (LPIPS(restorer.device) if cfg.lpips else None), ""
    output_dir = Path(cfg.output_dir)
    rows = []
    pairs = WholeImages(source)
    for index in track(range(len(source)), description=f"evaluating {len(source)} images", console=console):
        pair = pairs[index]
        blurry, target = pair["lq"][None], pair["gt"][None]
        restored = restorer.restore(blurry, target if restorer.needs_sharp else None).cpu()
        bit_depth = input_bit_depth(source, index)
        if cfg.quantize:
            restored = quantized(restored, bit_depth)
        try:
            row = score(restored, target, protocol, lpips)
        except LPIPSUnavailable as reason:
            lpips, lpips_note = None, str(reason)
            row = score(restored, target, protocol, None)
        row = {"name": source.name(index), "group": dpdd_group(index) if protocol == "dpdd" else "all", **row}
        rows.append(row)
        if cfg.save_images:
            write_image(output_dir / "images" / output_name(source, index), restored[0].permute(1, 2, 0).numpy(), bit_depth)

    summary = summarise(rows, protocol)
    write_results(output_dir, rows, summary, protocol, cfg, lpips_note)
    lpips_line = [Text(f"LPIPS not reported: {lpips_note}", style="yellow")] if lpips_note else []
    show(console, summary_table(summary, f"{protocol} protocol on {source.describe()}"), *lpips_line,
         f"Results: {output_dir}/summary.md, summary.json, per_image.csv")
    return summary


def write_results(output_dir: Path, rows: list[dict], summary: dict, protocol: str, cfg: DictConfig, lpips_note: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = ["name", "group", *[m for m in METRICS if m in rows[0]]]
    with open(output_dir / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    record = {
        "protocol": protocol,
        "ckpt": OmegaConf.to_container(cfg.ckpt) if isinstance(cfg.ckpt, DictConfig) else str(cfg.ckpt),
        "split": cfg.split,
        "inference": OmegaConf.to_container(cfg.inference, resolve=True),
        "summary": summary,
        "lpips_missing": lpips_note or None,
    }
    (output_dir / "summary.json").write_text(json.dumps(record, indent=2))
    (output_dir / "summary.md").write_text(markdown(summary))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
