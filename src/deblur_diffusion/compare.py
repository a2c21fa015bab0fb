"""Which images got better or worse between two evaluations:
``python -m deblur_diffusion.compare BASELINE CANDIDATE [--top N]``.

Each argument is an evaluation folder (holding ``per_image.csv``) or the CSV file itself. Images are
matched by name; the table gives, per metric, the mean change and how many images improved or got
worse, then the images whose PSNR changed most in each direction. Two evaluations scored with
different protocols (or splits) are refused: their numbers are not comparable. The protocol is read
from the ``summary.json`` beside each ``per_image.csv``. ``compare.html`` in the candidate's folder
(``--report PATH``) shows the same per image, with both restorations on a slider where the two
evaluations wrote their pictures (:mod:`deblur_diffusion.reports`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table

from deblur_diffusion.errors import DeblurError
from deblur_diffusion.reports import write_comparison_report

PER_IMAGE = "per_image.csv"
REPORT = "compare.html"
# Metrics where a lower value is better.
LOWER_IS_BETTER = ("mae", "lpips")
RESTORED_METRICS = ("psnr", "ssim", "mae", "lpips")
SUMMARY = "summary.json"
# What two evaluations must share for their per-image numbers to be compared.
SAME_IN_BOTH = ("protocol", "split", "prior_from_ground_truth")


def read_per_image(path: Path) -> dict[str, dict[str, float]]:
    """``{image name: {metric: value}}`` from an evaluation folder or its ``per_image.csv``."""
    csv_file = path / PER_IMAGE if path.is_dir() else path
    if not csv_file.is_file():
        raise DeblurError(f"{csv_file} not found: give an evaluation folder (with {PER_IMAGE}) or the CSV file")
    with open(csv_file, newline="") as handle:
        reader = csv.DictReader(handle)
        metrics = [m for m in RESTORED_METRICS if m in (reader.fieldnames or [])]
        if "name" not in (reader.fieldnames or []) or not metrics:
            raise DeblurError(f"{csv_file} is not a per_image.csv written by evaluate (columns: {reader.fieldnames})")
        return {row["name"]: {m: float(row[m]) for m in metrics} for row in reader}


def read_settings(path: Path) -> dict:
    """What an evaluation was scored with (:data:`SAME_IN_BOTH`), from the ``summary.json`` beside
    its ``per_image.csv`` (empty when there is none: a CSV from elsewhere)."""
    summary = (path if path.is_dir() else path.parent) / SUMMARY
    if not summary.is_file():
        return {}
    try:
        record = json.loads(summary.read_text())
    except json.JSONDecodeError as error:
        raise DeblurError(f"{summary} is not valid JSON ({error})") from error
    return {key: record.get(key, False if key == "prior_from_ground_truth" else None) for key in SAME_IN_BOTH}


def require_one_protocol(baseline: Path, candidate: Path) -> None:
    before, after = read_settings(baseline), read_settings(candidate)
    differing = [f"{key}: {before[key]!r} vs {after[key]!r}" for key in SAME_IN_BOTH if before and after and before[key] != after[key]]
    if differing:
        raise DeblurError(f"{baseline} and {candidate} were not scored alike ({'; '.join(differing)}): their numbers do not compare")


def comparison(baseline: Path, candidate: Path) -> dict:
    """What ``compare`` reports: the images of both runs (``shared``), each run's per-image values
    (``before``, ``after``), the ``metrics`` both have, their means (``summary``, as ``evaluate``
    lays out its own), and the images in one run only."""
    require_one_protocol(Path(baseline), Path(candidate))
    before, after = read_per_image(Path(baseline)), read_per_image(Path(candidate))
    shared = sorted(set(before) & set(after))
    if not shared:
        raise DeblurError(f"{baseline} and {candidate} have no image names in common")
    metrics = [m for m in RESTORED_METRICS if m in before[shared[0]] and m in after[shared[0]]]
    means = {m: sum(after[n][m] for n in shared) / len(shared) for m in metrics}
    baseline_means = {m: sum(before[n][m] for n in shared) / len(shared) for m in metrics}
    return {
        "shared": shared,
        "before": before,
        "after": after,
        "metrics": metrics,
        "summary": {"all": {"images": len(shared), **means, "baseline": baseline_means}},
        "only_in_one": sorted(set(before) ^ set(after)),
    }


def compare_runs(baseline: Path, candidate: Path, top: int = 5, found: dict | None = None) -> Group:
    """A report of ``candidate`` against ``baseline`` (both as for :func:`read_per_image`), from
    their :func:`comparison` when it was read already."""
    found = found or comparison(baseline, candidate)
    shared, before, after = found["shared"], found["before"], found["after"]
    overview = Table(title=f"{candidate} against {baseline}: {len(shared)} images in both")
    for column in ("metric", "baseline", "candidate", "mean change", "better", "worse", "same"):
        overview.add_column(column, justify="left" if column == "metric" else "right")
    for metric in found["metrics"]:
        changes = [after[n][metric] - before[n][metric] for n in shared]
        sign = -1 if metric in LOWER_IS_BETTER else 1
        better = sum(sign * c > 0 for c in changes)
        worse = sum(sign * c < 0 for c in changes)
        overview.add_row(
            metric,
            f"{found['summary']['all']['baseline'][metric]:.4f}",
            f"{found['summary']['all'][metric]:.4f}",
            f"{sum(changes) / len(changes):+.4f}",
            str(better),
            str(worse),
            str(len(changes) - better - worse),
        )
    change = {n: after[n]["psnr"] - before[n]["psnr"] for n in shared}
    improved = sorted((n for n in shared if change[n] > 0), key=change.get, reverse=True)[:top]
    worsened = sorted((n for n in shared if change[n] < 0), key=change.get)[:top]
    extremes = Table(title=f"largest PSNR changes (up to {top} each way)")
    for column in ("image", "baseline PSNR", "candidate PSNR", "change (dB)"):
        extremes.add_column(column, justify="left" if column == "image" else "right")
    for name in improved + worsened:
        extremes.add_row(name, f"{before[name]['psnr']:.2f}", f"{after[name]['psnr']:.2f}", f"{change[name]:+.2f}")
    notes = []
    only = found["only_in_one"]
    if only:
        notes.append(f"{len(only)} images are in one run only, e.g. {only[:3]}")
    return Group(overview, extremes, *notes)


def compare_with_report(baseline: Path, candidate: Path, top: int = 5, report: Path | None = None) -> tuple[Group, Path]:
    """:func:`compare_runs`, and its HTML report written to ``report`` (default: ``compare.html``
    in the candidate's folder); returns the printed report and the page."""
    found = comparison(baseline, candidate)
    candidate_dir = candidate if candidate.is_dir() else candidate.parent
    baseline_dir = baseline if baseline.is_dir() else baseline.parent
    page = write_comparison_report(report or candidate_dir / REPORT, baseline_dir, candidate_dir, found)
    return compare_runs(baseline, candidate, top, found), page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deblur_diffusion.compare", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="evaluation folder or per_image.csv")
    parser.add_argument("candidate", type=Path, help="evaluation folder or per_image.csv")
    parser.add_argument("--top", type=int, default=5, help="images listed in each direction (default 5)")
    parser.add_argument(
        "--report", type=Path, default=None, help="where the HTML report goes (default: compare.html in the candidate's folder)"
    )
    args = parser.parse_args(argv)
    try:
        table, page = compare_with_report(args.baseline, args.candidate, args.top, args.report)
    except DeblurError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}")
        return 1
    Console().print(table, f"Report: {page} (open it in a browser)", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
