"""The visual reports, opened in a real browser (Debian's chromium, driven by Playwright) from
``file://``: one row per image in gain order, every picture loaded, sorting, the viewer, no
console error. Screenshots go to ``build/screenshots/`` for a person to look at."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import torch
from conftest import REPO_ROOT, compose_config
from networks import TINY_UNET

from deblur_diffusion.compare import main as compare_main
from deblur_diffusion.evaluate import evaluate
from deblur_diffusion.models import Restormer

SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
IMAGES = 60  # more than one page of the table (50 rows)


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
    page.goto(path.as_uri())
    # Lazy thumbnails load once scrolled to.
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_load_state("networkidle")
    return page, errors


def all_pictures_loaded(page) -> bool:
    return page.evaluate("[...document.images].filter(i => i.getAttribute('src')).every(i => i.complete && i.naturalWidth > 0)")


def evaluation(tmp_path: Path, name: str, seed: int, images: int = IMAGES, *overrides: str) -> Path:
    torch.manual_seed(seed)
    torch.save({"params": Restormer(**TINY_UNET).state_dict()}, tmp_path / f"{name}.pth")
    out = tmp_path / name
    cfg = compose_config(
        "evaluate",
        tmp_path,
        f"ckpt={tmp_path / f'{name}.pth'}",
        "split=val",
        f"data.val.length={images}",
        "data.val.image_size=40",
        "lpips=false",
        "device=cpu",
        f"output_dir={out}",
        *overrides,
    )
    evaluate(cfg)
    return out


def per_image(folder: Path) -> dict[str, dict[str, float]]:
    with open(folder / "per_image.csv", newline="") as handle:
        return {
            row["name"]: {key: float(value) for key, value in row.items() if key not in ("name", "group")} for row in csv.DictReader(handle)
        }


def shown_names(page) -> list[str]:
    return page.eval_on_selector_all("#images tr.row td.name", "cells => cells.map(c => c.textContent)")


def gallery(page, which: str) -> list[str]:
    return page.eval_on_selector_all(f"#{which} figcaption", "captions => captions.map(c => c.textContent.split(' ')[0])")


def test_an_evaluation_report_opens_from_file_in_gain_order_with_every_picture(tmp_path, browser):
    folder = evaluation(tmp_path, "eval", seed=0)
    scores = per_image(folder)
    by_gain = sorted(scores, key=lambda name: scores[name]["psnr"] - scores[name]["input_psnr"], reverse=True)
    page, errors = open_page(browser, folder / "report.html")
    assert shown_names(page) == by_gain[:50]  # the first page, largest PSNR gain first
    assert gallery(page, "best") == by_gain[:6] and gallery(page, "worst") == by_gain[::-1][:6]
    assert page.locator("#pager button").count() == 2
    assert all_pictures_loaded(page)
    page.click("#pager button:nth-child(2)")
    assert shown_names(page) == by_gain[50:]
    page.click("#images th[data-key='value:psnr']")  # sorted by the restored PSNR, highest first
    assert shown_names(page) == sorted(scores, key=lambda name: scores[name]["psnr"], reverse=True)[:50]
    page.click("#images tr.row >> nth=0")
    page.fill("#zoom", "2")
    page.dispatch_event("#zoom", "input")
    page.wait_for_load_state("networkidle")
    assert page.is_visible("#viewer") and all_pictures_loaded(page)
    assert page.evaluate("document.getElementById('top').style.transform") == page.evaluate(
        "document.getElementById('error').style.transform"
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "evaluation_report.png"), full_page=False)
    assert not errors, errors
    # Self-contained: the folder opens where it is moved to.
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    page, errors = open_page(browser, moved / "report.html")
    assert all_pictures_loaded(page) and not errors


def test_the_galleries_of_a_small_set_show_each_image_once(tmp_path, browser):
    folder = evaluation(tmp_path, "eval", seed=0, images=8)
    scores = per_image(folder)
    by_gain = sorted(scores, key=lambda name: scores[name]["psnr"] - scores[name]["input_psnr"], reverse=True)
    page, errors = open_page(browser, folder / "report.html")
    assert gallery(page, "best") == by_gain[:4] and gallery(page, "worst") == by_gain[::-1][:4]
    assert not errors, errors


def test_evaluate_compare_to_writes_the_comparison_report(tmp_path):
    baseline = evaluation(tmp_path, "baseline", 0, 4)
    candidate = evaluation(tmp_path, "candidate", 1, 4, f"compare_to={baseline}")
    page = (candidate / "compare.html").read_text()
    # A comparison, not the candidate's own report: the baseline's restorations are on it.
    assert "baseline/report/" in page and all(name in page for name in per_image(baseline))


def test_a_comparison_report_shows_both_restorations_per_image_in_order_of_change(tmp_path, browser):
    baseline, candidate = evaluation(tmp_path, "baseline", seed=0), evaluation(tmp_path, "candidate", seed=1)
    assert compare_main([str(baseline), str(candidate)]) == 0
    before, after = per_image(baseline), per_image(candidate)
    by_change = sorted(after, key=lambda name: after[name]["psnr"] - before[name]["psnr"], reverse=True)
    page, errors = open_page(browser, candidate / "compare.html")
    assert shown_names(page) == by_change[:50]
    page.click("#images tr.row >> nth=0")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("document.getElementById('top').src").endswith("_restored.jpg")  # the baseline's restoration on the left
    assert "/baseline/report/" in page.evaluate("document.getElementById('top').src")
    assert all_pictures_loaded(page)
    page.screenshot(path=str(SCREENSHOTS / "comparison_report.png"), full_page=False)
    assert not errors, errors
