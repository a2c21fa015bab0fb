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
    # The long tests first, so that the workers do not end waiting on one of them.
    items.sort(key=lambda item: "slow" not in item.keywords)
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
def serve_folder(tmp_path, monkeypatch):
    """``serve_folder(folder)``: the address of ``folder`` served on 127.0.0.1 (as a release's
    files are published), with downloads cached under the test's own folder."""
    import functools
    import http.server
    import threading

    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(tmp_path / "download_cache"))
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def compose_config(name: str, root: Path, *overrides: str, output_dir: Path | None = None) -> DictConfig:
    """An entry point's config composed in-process, with its paths under ``root`` (outputs in
    ``output_dir``, ``root`` by default)."""
    paths = [f"paths.root_dir={root}", f"paths.output_dir={output_dir or root}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=[*overrides, *paths])


def run_cli(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300, isolated: bool = False
) -> subprocess.CompletedProcess:
    """Runs ``python -m deblur_diffusion.<module> args`` and returns the finished process.

    In this process (the entry point's ``main`` with that command line, its output captured, the
    process state it may change put back after), unless ``isolated``: a real process, for what a
    subprocess is needed for (signals, launchers that start ranks, notebooks' kernels, timeouts).
    Starting Python with torch and Lightning takes 6-10 s on a CI machine, most of such a test."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    # Lightning's DDP launcher starts the other ranks by running this command line again.
    if isolated or any(arg.startswith("trainer=ddp") for arg in args):
        return subprocess.run(
            [sys.executable, "-m", f"deblur_diffusion.{module}", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return _run_in_process(module, list(args), cwd, full_env)


def _run_in_process(module: str, args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    import contextlib
    import importlib
    import io
    import logging
    import signal
    import traceback
    import warnings

    from hydra.core.global_hydra import GlobalHydra

    entry_point = importlib.import_module(f"deblur_diffusion.{module}")
    saved_environ, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    saved_logging = {name: (logger.handlers[:], logger.level, logger.propagate) for name, logger in _loggers().items()}
    saved_threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [entry_point.__file__, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                entry_point.main()
            except SystemExit as error:
                returncode = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
                if isinstance(error.code, str):
                    err.write(error.code + "\n")
            except Exception:  # what Python prints, and the exit status, of an uncaught error
                err.write(traceback.format_exc())
                returncode = 1
    finally:
        GlobalHydra.instance().clear()
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environ)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        for name, logger in _loggers().items():
            handlers, level, propagate = saved_logging.get(name, ([], logging.NOTSET, True))
            for handler in set(logger.handlers) - set(handlers):
                handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(
        [sys.executable, "-m", f"deblur_diffusion.{module}", *args], returncode, out.getvalue(), err.getvalue()
    )


def _loggers() -> dict:
    import logging

    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
    return {"": logging.getLogger(), **loggers}


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
