from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from deblur_diffusion.cli import config_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# The parity fixtures live in the repository (tests/fixtures); DEBLUR_FIXTURES points elsewhere.
FIXTURES = Path(os.environ.get("DEBLUR_FIXTURES", REPO_ROOT / "tests" / "fixtures"))
PARITY = FIXTURES / "official_parity"
# predict and the app run through ONNX Runtime on a CPU by default, which exports each network's
# graph once (20-40 s for a tiny one): the tests of that path (test_onnx_runtime.py) ask for it, the
# others restore through PyTorch (subprocesses inherit this).
os.environ.setdefault("DEBLUR_DIFFUSION_BACKEND", "torch")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; CI machines have none")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY.is_dir():
        pytest.skip(f"official parity fixtures not found at {PARITY} (set DEBLUR_FIXTURES to the fixtures folder)")
    return PARITY


CHROMIUM = Path("/usr/bin/chromium")
# CI installs the browser (.ci/run) and sets this: there, a missing browser fails instead of skipping.
BROWSER_REQUIRED = os.environ.get("DEBLUR_BROWSER_REQUIRED") == "1"


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (never Playwright's own browser download)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        if BROWSER_REQUIRED:
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install -y chromium)")
    with playwright.sync_playwright() as driver:
        args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield launched
        launched.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def compose_config(name: str, root: Path, *overrides: str, output_dir: Path | None = None) -> DictConfig:
    """An entry point's config composed in-process, with its paths under ``root`` (outputs in
    ``output_dir``, ``root`` by default)."""
    paths = [f"paths.root_dir={root}", f"paths.output_dir={output_dir or root}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=[*overrides, *paths])


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``python -m deblur_diffusion.<module> args`` and returns the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", f"deblur_diffusion.{module}", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _as_overrides(node, prefix: str) -> list[str]:
    """A config node as command-line overrides (``prefix.key=value``, nested keys flattened)."""
    flat = []
    for key, value in node.items():
        if OmegaConf.is_dict(value):
            flat += _as_overrides(value, f"{prefix}.{key}")
        else:
            flat.append(f"{prefix}.{key}={OmegaConf.to_container(value) if OmegaConf.is_list(value) else value}".replace(" ", ""))
    return flat


# The pieces of debug=tiny (conf/debug/tiny.yaml), for tests that combine them with other models,
# data or trainers: a Restormer that trains a few steps in seconds on a CPU, small synthetic pairs,
# and a four-step trainer.
_DEBUG = OmegaConf.load(Path(config_dir()) / "debug" / "tiny.yaml")
TINY_RESTORMER = _as_overrides(OmegaConf.load(Path(config_dir()) / "model" / "restormer_tiny.yaml").net, "model.net")
_TINY_DATA = {key: value for key, value in OmegaConf.load(Path(config_dir()) / "data" / "synthetic_tiny.yaml").items() if key != "defaults"}
TINY_SYNTHETIC = _as_overrides(OmegaConf.merge(_TINY_DATA, _DEBUG.data), "data")
FAST_TRAINER = ["trainer=cpu", *_as_overrides(_DEBUG.trainer, "trainer")]


def official_schedule(iters, gt_sizes, batch_sizes, per_gpu_batches=None):
    """A ProgressiveSchedule from the official option files' fields (iterations per phase, patch
    sizes, global batch sizes, and per-GPU batches as the phases' caps): each phase starts where
    the previous ones' iterations end."""
    from itertools import accumulate

    from deblur_diffusion.data.schedule import ProgressiveSchedule

    starts = [0, *accumulate(iters)][: len(iters)]
    columns = [starts, gt_sizes, batch_sizes] + ([per_gpu_batches] if per_gpu_batches is not None else [])
    return ProgressiveSchedule([list(phase) for phase in zip(*columns, strict=True)])
