"""Restoring through ONNX Runtime, which runs these networks 1.6-2.5x faster than PyTorch on a CPU.

``backend=auto`` (predict's and the app's default) picks ONNX Runtime when the restorer runs on a
CPU in float32, ``onnxruntime`` is installed (the ``export`` extra) and the network is one graph
(Restormer, Swintormer; not the diffusion models, which sample noise over T calls). The graph is
exported once per network and weights into ``<cache>/onnx/`` (the cache of downloaded weights, see
:mod:`deblur_diffusion.downloads`) and reused; each time a graph is loaded it is first checked
against PyTorch on a small image, and exported again if it does not agree. A network whose export
takes long (``SLOW_EXPORTS``) is exported only on ``backend=onnxruntime``; ``auto`` then uses its
graph once it is in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deblur_diffusion.errors import ConfigError

BACKENDS = ("auto", "torch", "onnxruntime")
# How the entry points name what ran.
BACKEND_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
# The largest difference allowed between ONNX Runtime's output and PyTorch's (float32 throughout).
ONNX_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "blurry", "restored"
LOG = logging.getLogger("deblur_diffusion")


# Networks whose export takes too long for auto to start it on its own (measured on 2 cores with
# the paper configuration: benchmarks/predict_12mp.py); Restormer's takes 76 s.
SLOW_EXPORTS = {"Swintormer": "its export takes about 12 minutes and 5 GB on 2 cores (the windowed attention's graph)"}


def not_exportable(net: nn.Module) -> str | None:
    """Why ``net`` has no ONNX graph, or None when it has one."""
    if getattr(net, "samples_noise", False) or getattr(net, "needs_sharp_input", False) or not hasattr(net, "size_multiple"):
        return (
            f"{type(net).__name__} is not exported to ONNX: only Restormer and Swintormer are (a diffusion model samples "
            "seeded noise over T network calls at inference; HI-Diff stage one reads the sharp image)"
        )
    return None


def probe_sizes(multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(traced size, checked size): neither a multiple of the padding, so that the traced graph keeps
    its padding and crop (an example of a multiple would trace them away), and checked at another."""
    return (2 * multiple + 3, 2 * multiple + 5), (3 * multiple + 7, multiple + multiple // 2 + 1)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ConfigError(
            "ONNX needs the export extra: pip install '.[export]' (onnx, onnxscript, onnxruntime) in the package's folder"
        ) from error
    return onnxruntime


def export_graph(net: nn.Module, path: Path) -> float:
    """Writes ``net``'s graph (one image of any height and width, padding and crop inside) to
    ``path``; returns the largest difference from PyTorch at a second size (ConfigError above
    ``ONNX_TOLERANCE``)."""
    reason = not_exportable(net)
    if reason:
        raise ConfigError(reason)
    net = net.eval()
    traced, checked = probe_sizes(net.size_multiple)
    dims = {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    device = next(net.parameters()).device
    example = torch.rand(1, net.input_channels, *traced, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporter():
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes={"x": dims},
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    difference = graph_difference(OnnxRuntimeNetwork(path), net, checked)
    if difference > ONNX_TOLERANCE:
        raise ConfigError(
            f"{path}: onnxruntime differs from PyTorch by {difference:.2e} at {checked[0]}x{checked[1]} (more than {ONNX_TOLERANCE})"
        )
    return difference


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's optimiser logs every rewrite at INFO (a few hundred lines for one Restormer),
    which the entry points' logging would print: only its warnings and errors are let through."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def graph_difference(graph: OnnxRuntimeNetwork, net: nn.Module, size: tuple[int, int]) -> float:
    """The largest difference between the graph's output and the network's on one seeded image."""
    device = next(net.parameters()).device
    probe = torch.rand(1, net.input_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(probe.to(device)).cpu()
    return float((graph(probe) - expected).abs().max())


class OnnxRuntimeNetwork:
    """An exported graph as a function of (B, C, H, W) float32 tensors, like the network's forward;
    ONNX Runtime uses as many threads as PyTorch."""

    def __init__(self, path: str | Path):
        onnxruntime = import_onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # The graph takes one image at a time (tiles come in batches).
        images = batch.detach().cpu().float().numpy()
        try:
            outputs = [self.session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + 1]})[0] for i in range(len(images))]
        except Exception as error:  # onnxruntime's own exception types derive from Exception only
            if "allocate memory" in str(error):
                raise RuntimeError(f"onnxruntime: out of memory ({error})") from error
            raise
        return torch.from_numpy(np.concatenate(outputs)).to(batch.device)


def graph_key(net: nn.Module, config: Mapping | None) -> str:
    """A name for the graph of ``net``: its class, its architecture config, its weights, and the
    versions of what traces it."""
    from deblur_diffusion import __version__

    digest = hashlib.sha256()
    header = {"class": type(net).__name__, "config": config, "package": __version__, "torch": torch.__version__}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def graph_path(net: nn.Module, config: Mapping | None) -> Path:
    from deblur_diffusion.downloads import cache_dir

    return cache_dir() / "onnx" / graph_key(net, config) / "model.onnx"


def cached_graph(net: nn.Module, config: Mapping | None) -> OnnxRuntimeNetwork:
    """The ONNX Runtime graph of ``net``: from the cache when there is one that agrees with PyTorch,
    else exported (once per network and weights) into it."""
    path = graph_path(net, config)
    if path.is_file():
        try:
            graph = OnnxRuntimeNetwork(path)
            difference = graph_difference(graph, net, probe_sizes(net.size_multiple)[1])
        except Exception as error:  # a truncated or foreign file: export it again
            LOG.warning("the ONNX graph %s could not be used (%s); exporting it again", path, error)
        else:
            if difference <= ONNX_TOLERANCE:
                return graph
            LOG.warning("the ONNX graph %s differs from PyTorch by %.1e; exporting it again", path, difference)
    LOG.info("exporting the network to ONNX once for these weights (%s)", path)
    partial = path.with_name(f"model.{os.getpid()}.partial.onnx")
    try:
        export_graph(net, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return OnnxRuntimeNetwork(path)


def chosen_backend(backend: str, net: nn.Module, device: torch.device, precision: str, config: Mapping | None = None) -> str:
    """``torch`` or ``onnxruntime`` for ``backend`` (``auto``: ONNX Runtime where it applies);
    ConfigError for an explicit ``onnxruntime`` that cannot run, naming why."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return backend
    reasons = []
    if device.type != "cpu":
        reasons.append(f"it runs on the CPU, not {device}")
    if precision != "fp32":
        reasons.append(f"it runs in fp32, not {precision}")
    reason = not_exportable(net)
    if reason:
        reasons.append(reason)
    try:
        import_onnxruntime()
    except ConfigError as error:
        reasons.append(str(error))
    slow = SLOW_EXPORTS.get(type(net).__name__)
    if not reasons and backend == "auto" and slow and not graph_path(net, config).is_file():
        LOG.info("restoring through PyTorch: %s; backend=onnxruntime exports it once, then restores faster", slow)
        return "torch"
    if not reasons:
        return "onnxruntime"
    if backend == "onnxruntime":
        raise ConfigError(f"backend=onnxruntime: {'; '.join(reasons)}")
    return "torch"
