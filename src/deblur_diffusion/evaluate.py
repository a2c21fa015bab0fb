"""Evaluation with the papers' protocols: ``python -m deblur_diffusion.evaluate ckpt=... data=...``.

Restores every pair of a dataset split, read through the data config's DataModule exactly as
validation reads it (priors, dual-pixel views, bit depth), and scores the blurry input and the
restored image with the dataset's protocol (:mod:`deblur_diffusion.protocols`; ``protocol=``
overrides the data config's).

Writes ``per_image.csv``, ``summary.json`` and ``summary.md`` (and with ``save_images=true`` the
restored images, with the input's bit depth and file name) to the run folder and prints the table;
``compare_to=<another evaluation folder>`` then lists which images got better or worse.

The "blurry input" row scores the image a reader of the paper's table would call the input: the
blurry image, or for dual-pixel data DPDD's combined view (not one of the two views the model reads).

A HI-Diff stage-one network computes its prior from the sharp image, so its output is not a
restoration: it is refused unless ``score_with_ground_truth_prior=true``, and then every output says so.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.progress import track
from rich.table import Table
from rich.text import Text

from deblur_diffusion.channels import IMAGE_CHANNELS
from deblur_diffusion.cli import (
    config_dir,
    report_errors,
    require_complete,
    restorer_and_record,
    show,
    split_datamodule,
    unused_data_splits,
)
from deblur_diffusion.compare import compare_with_report
from deblur_diffusion.data.datamodule import DeblurDataModule
from deblur_diffusion.data.io import quantized, write_atomically, write_image
from deblur_diffusion.data.patches import WholeImages
from deblur_diffusion.data.sources import PairSource
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.loggers import resolve_wandb_mode
from deblur_diffusion.metrics import LPIPS, LPIPSUnavailableError
from deblur_diffusion.protocols import Protocol, get_protocol
from deblur_diffusion.provenance import provenance
from deblur_diffusion.reports import PICTURES, REPORT_IMAGES, ReportPictures, write_evaluation_report
from deblur_diffusion.visualize import comparison_row

GROUND_TRUTH_PRIOR_NOTE = "NOT A RESTORATION: the network's prior was computed from the ground truth (HI-Diff stage one)"
GROUND_TRUTH_PRIOR_COLUMN = "prior_from_ground_truth"


def resolve_protocol(cfg: DictConfig, datamodule: DeblurDataModule, source: PairSource) -> Protocol:
    protocol = get_protocol(datamodule.protocol if cfg.protocol == "auto" else cfg.protocol)
    read_8bit = source.read_8bit
    if protocol.read_8bit is not None and protocol.read_8bit != read_8bit:
        raise ConfigError(
            f"protocol {protocol.name} reads the images {'as 8 bits' if protocol.read_8bit else 'at their stored depth'} "
            f"({protocol.script}) but data.{cfg.split}.read_8bit={str(read_8bit).lower()}; "
            f"set data.{cfg.split}.read_8bit={str(protocol.read_8bit).lower()} or pick another protocol"
        )
    return protocol


def summarise(rows: list[dict], metrics: list[str]) -> dict[str, dict]:
    """Mean metrics per group and combined: ``{group: {"images": n, <metric>: restored mean,
    "input": {<metric>: blurry-input mean}}}``."""
    groups = sorted({row["group"] for row in rows} - {"all"})
    members = {group: [r for r in rows if r["group"] == group] for group in groups}
    members["combined" if groups else "all"] = rows
    summary = {}
    for group, selected in members.items():
        summary[group] = {"images": len(selected)} | {m: float(np.mean([r[m] for r in selected])) for m in metrics}
        summary[group]["input"] = {m: float(np.mean([r[f"input_{m}"] for r in selected])) for m in metrics}
    return summary


def _formatted(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def summary_table(summary: dict, protocol: Protocol, metrics: list[str], title: str, note: str = "") -> Table:
    caption = f"protocol {protocol.name}: {protocol.script}" + (f"\n{note}" if note else "")
    table = Table(title=title, caption=caption)
    table.add_column("group")
    table.add_column("images", justify="right")
    table.add_column("scored")
    for metric in metrics:
        table.add_column(protocol.columns[metric], justify="right")
    table.add_column("PSNR gain (dB)", justify="right")
    for group, values in summary.items():
        gain = values["psnr"] - values["input"]["psnr"]
        table.add_row(group, str(values["images"]), "blurry input", *[_formatted(m, values["input"][m]) for m in metrics], "")
        table.add_row("", "", "restored", *[_formatted(m, values[m]) for m in metrics], f"{gain:+.2f}", end_section=True)
    return table


def markdown(summary: dict, protocol: Protocol, metrics: list[str], note: str = "", lpips_note: str = "") -> str:
    header = ["group", "images", "scored", *[protocol.columns[m] for m in metrics], "PSNR gain (dB)"]
    lines = [
        *([f"**{note}.**", ""] if note else []),
        f"Protocol `{protocol.name}`: {protocol.script}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for group, values in summary.items():
        gain = values["psnr"] - values["input"]["psnr"]
        lines.append(
            f"| {group} | {values['images']} | blurry input | " + " | ".join(_formatted(m, values["input"][m]) for m in metrics) + " | |"
        )
        lines.append(
            f"| {group} | {values['images']} | restored | " + " | ".join(_formatted(m, values[m]) for m in metrics) + f" | {gain:+.2f} |"
        )
    if lpips_note:
        lines += ["", f"LPIPS was not computed: {lpips_note}."]
    return "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig) -> dict:
    """Runs the evaluation of ``cfg``; returns the summary (also written to ``cfg.output_dir``)."""
    with open_dict(cfg):
        # An experiment preset's trainer, composed with it, is not used here (its intervals wait
        # for the accumulation that train works out).
        cfg.pop("trainer", None)
    require_complete(cfg, unused=("model.", *unused_data_splits(cfg, cfg.split)))
    torch.manual_seed(cfg.seed)
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {cfg.split!r}")
    datamodule = split_datamodule(cfg, cfg.split)
    source = datamodule.pairs(cfg.split)
    protocol = resolve_protocol(cfg, datamodule, source)
    restorer, loaded = restorer_and_record(cfg)
    if restorer.needs_sharp and not cfg.score_with_ground_truth_prior:
        raise ConfigError(
            f"{cfg.ckpt} is a HI-Diff stage-one network: its prior is computed from the sharp image, so its scores are not "
            "a restoration's. Evaluate stage two (model=hidiff_s2), or set score_with_ground_truth_prior=true to score it "
            "anyway, marked as such"
        )
    note = GROUND_TRUTH_PRIOR_NOTE if restorer.needs_sharp else ""
    if source.in_channels != restorer.input_channels:
        raise ConfigError(
            f"the model reads {restorer.input_channels} input channels but data.{cfg.split} gives {source.in_channels} "
            f"({source.describe()}); pick the matching data config (data=dpdd_dual for dual-pixel models, "
            "data.prior_dir=... for prior-fused models)"
        )
    console = Console()
    lpips = LPIPS(restorer.device) if cfg.lpips and protocol.lpips else None
    lpips_note = ""
    output_dir = Path(cfg.output_dir)
    rows, pictures = [], {}
    report_pictures = ReportPictures(output_dir / PICTURES) if cfg.report else None
    loader = datamodule.evaluation_dataloader(cfg.split)
    shown_input = blurry_input(cfg, datamodule, source)
    for batch in track(loader, total=len(source), description=f"evaluating {len(source)} images", console=console):
        index = int(batch["index"][0])
        blurry, target = batch["lq"], batch["gt"]
        restored = restorer.restore(blurry, target if restorer.needs_sharp else None).cpu()
        blurry_image = shown_input(index, blurry)
        bit_depth = source.bit_depth(index)
        if protocol.eight_bit_only and bit_depth != 8:
            raise ConfigError(f"protocol {protocol.name} scores 8-bit images ({protocol.script}); {source.name(index)} is {bit_depth}-bit")
        scored = torch.from_numpy(quantized(restored.numpy(), bit_depth)) if protocol.scores_saved_file else restored
        try:
            restored_row = protocol.score(scored, target, lpips)
            input_row = protocol.score(blurry_image, target, lpips)
        except LPIPSUnavailableError as reason:
            lpips, lpips_note = None, str(reason)
            restored_row = protocol.score(scored, target, None)
            input_row = protocol.score(blurry_image, target, None)
        rows.append(
            {"name": source.name(index), "group": protocol.groups(index, len(source)), **restored_row}
            | {f"input_{metric}": value for metric, value in input_row.items()}
            | ({GROUND_TRUTH_PRIOR_COLUMN: True} if note else {})
        )
        if report_pictures is not None:
            rows[-1]["pictures"] = report_pictures.add(len(rows) - 1, blurry_image[0], restored[0], target[0])
        if cfg.wandb.enabled and len(pictures) < cfg.wandb.images:
            pictures[source.name(index)] = wandb_picture(blurry_image[0], restored[0], target[0])
        if cfg.save_images:
            name = source.name(index) + source.file_suffix(index)
            write_image(output_dir / "images" / name, restored[0].permute(1, 2, 0).numpy(), bit_depth)

    metrics = [metric for metric in protocol.columns if all(metric in row for row in rows)]
    summary = summarise(rows, metrics)
    write_results(output_dir, rows, summary, protocol, metrics, cfg, lpips_note, restorer.weights, loaded.sha256, note)
    report = []
    if report_pictures is not None:
        caption = f"{source.describe()} ({cfg.split}), protocol {protocol.name}" + (f"; {note}" if note else "")
        report_page = write_evaluation_report(output_dir, rows, summary, metrics, protocol.columns, caption)
        write_atomically(output_dir / REPORT_IMAGES, json.dumps({row["name"]: row["pictures"] for row in rows}, indent=1))
        report = [f"Report: {report_page} (open it in a browser)"]
    lpips_line = [Text(f"LPIPS not reported: {lpips_note}", style="yellow")] if lpips_note else []
    show(
        console,
        summary_table(summary, protocol, metrics, f"{source.describe()} ({cfg.split})", note),
        *lpips_line,
        f"Results: {output_dir}/summary.md, summary.json, per_image.csv",
        *report,
    )
    if cfg.compare_to:
        table, page = compare_with_report(Path(cfg.compare_to), output_dir)
        show(console, table, f"Comparison: {page} (open it in a browser)")
    if cfg.wandb.enabled:
        log_to_wandb(cfg, protocol, rows, metrics, summary, pictures, output_dir)
    return summary


def evaluate_training_run(train_cfg: DictConfig, ckpt: str, output_dir: Path) -> Path:
    """Scores ``ckpt`` of a training run on its val split as ``evaluate split=val`` does, with the
    run's own data and inference settings; writes the results and ``report.html`` to ``output_dir``."""
    cfg = hydra.compose(config_name="evaluate")
    with open_dict(cfg):
        cfg.ckpt = ckpt
        cfg.split = "val"
        cfg.data = OmegaConf.to_container(train_cfg.data, resolve=True)
        cfg.inference = OmegaConf.to_container(train_cfg.inference, resolve=True)
        cfg.output_dir = str(output_dir)
        # LPIPS downloads a VGG or AlexNet: not for a closing report.
        cfg.lpips = False
    evaluate(cfg)
    return output_dir / "report.html"


# The side of a panel of the pictures sent to W&B: larger images are subsampled to fit.
WANDB_PANEL_SIDE = 512


def wandb_picture(blurry: torch.Tensor, restored: torch.Tensor, sharp: torch.Tensor) -> np.ndarray:
    """``blurry | restored | sharp`` with PSNR labels, each panel at most ``WANDB_PANEL_SIDE`` wide."""
    step = -(-max(sharp.shape[-2:]) // WANDB_PANEL_SIDE)
    return comparison_row(*(image[..., ::step, ::step] for image in (blurry, restored, sharp)))


def log_to_wandb(
    cfg: DictConfig, protocol: Protocol, rows: list[dict], metrics: list[str], summary: dict, pictures: dict, output_dir: Path
) -> None:
    """One W&B run (job type ``evaluate``) with the summary and the per-image table, the pictures
    of the first ``wandb.images`` images in its last column."""
    try:
        import wandb
    except ImportError as error:
        raise ConfigError("wandb.enabled=true needs wandb, an optional dependency: pip install 'deblur-diffusion[loggers]'") from error
    ckpt = OmegaConf.to_container(cfg.ckpt) if isinstance(cfg.ckpt, DictConfig) else str(cfg.ckpt)
    run = wandb.init(
        project=cfg.wandb.project,
        name=f"evaluate {protocol.name} {cfg.split} {Path(str(ckpt)).name if isinstance(ckpt, str) else 'parts'}",
        job_type="evaluate",
        dir=str(output_dir),
        mode=resolve_wandb_mode(cfg.wandb.mode),
        config={"ckpt": ckpt, "split": cfg.split, "protocol": protocol.name, "inference": OmegaConf.to_container(cfg.inference)},
    )
    columns = ["name", "group", *metrics, *[f"input_{metric}" for metric in metrics]]
    table = wandb.Table(columns=[*columns, "blurry | restored | sharp"])
    for row in rows:
        picture = pictures.get(row["name"])
        table.add_data(*(row.get(column) for column in columns), wandb.Image(picture) if picture is not None else None)
    run.log({"per_image": table})
    run.summary.update(summary)
    run.finish()


def blurry_input(cfg: DictConfig, datamodule: DeblurDataModule, source: PairSource):
    """``(index, model input) -> the blurry image`` the "blurry input" row scores: the input's first
    image (the blurry one; a prior follows it), or for dual-pixel data the combined view of the pair."""
    if not datamodule.dual_pixel:
        return lambda index, blurry: blurry[:, :IMAGE_CHANNELS]
    combined_source = split_datamodule(
        cfg, cfg.split, prior_dir=None, in_channels=IMAGE_CHANNELS, dual_pixel=False, **{cfg.split: {"views": ["c"]}}
    ).pairs(cfg.split)
    if [combined_source.name(i) for i in range(len(combined_source))] != [source.name(i) for i in range(len(source))]:
        raise ConfigError(
            f"the combined views of data.{cfg.split} are not the pairs of its dual-pixel views ({combined_source.describe()})"
        )
    combined = WholeImages(combined_source)
    return lambda index, blurry: combined[index]["lq"][None]


def write_results(
    output_dir: Path,
    rows: list[dict],
    summary: dict,
    protocol: Protocol,
    metrics: list[str],
    cfg: DictConfig,
    lpips_note: str,
    weights: str,
    sha256: str | dict[str, str],
    note: str = "",
) -> None:
    """per_image.csv, summary.json and summary.md; ``weights`` is what was loaded (``ema``, ``raw``,
    an official file's key), ``sha256`` the digest of its file (of each part's file) and ``note``
    marks scores that are not a restoration's."""
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = ["name", "group", *metrics, *[f"input_{m}" for m in metrics], *([GROUND_TRUTH_PRIOR_COLUMN] if note else [])]
    with open(output_dir / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    record = {
        "protocol": protocol.name,
        "protocol_source": protocol.script,
        "columns": {m: protocol.columns[m] for m in metrics},
        "ckpt": OmegaConf.to_container(cfg.ckpt) if isinstance(cfg.ckpt, DictConfig) else str(cfg.ckpt),
        "weights": weights,
        "ckpt_sha256": sha256,
        "split": cfg.split,
        "inference": OmegaConf.to_container(cfg.inference, resolve=True),
        "summary": summary,
        "lpips_missing": lpips_note or None,
        GROUND_TRUTH_PRIOR_COLUMN: bool(note),
        "provenance": provenance(),
    }
    if note:
        record["note"] = note
    (output_dir / "summary.json").write_text(json.dumps(record, indent=2))
    (output_dir / "summary.md").write_text(markdown(summary, protocol, metrics, note, lpips_note))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
