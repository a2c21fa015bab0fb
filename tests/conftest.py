from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The parity fixtures live in the repository (tests/fixtures); DEBLUR_FIXTURES points elsewhere.
FIXTURES = Path(os.environ.get("DEBLUR_FIXTURES", REPO_ROOT / "tests" / "fixtures"))
PARITY = FIXTURES / "official_parity"


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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


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


# A Restormer small enough to train a few steps in seconds on a CPU.
TINY_RESTORMER = [
    "model.net.dim=8",
    "model.net.num_blocks=[1,1,1,1]",
    "model.net.num_refinement_blocks=1",
    "model.net.heads=[1,1,1,1]",
]
TINY_SYNTHETIC = [
    "data.train.length=64",
    "data.train.image_size=48",
    "data.val.length=2",
    "data.val.image_size=32",
    "data.patch_schedule=[[0,32,2]]",
    "data.num_workers=0",
]
FAST_TRAINER = [
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
]
