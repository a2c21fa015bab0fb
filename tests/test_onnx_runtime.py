"""Restoring through ONNX Runtime (predict's backend=auto on a CPU): the same outputs as PyTorch at
every size PyTorch takes, with the release's window, one graph exported per weights and reused."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import compose_config
from networks import TINY_UNET

from deblur_diffusion.data.io import read_image_raw, write_image
from deblur_diffusion.errors import ConfigError
from deblur_diffusion.inference.onnx import cached_graph, graph_path
from deblur_diffusion.models import Restormer, Swintormer
from deblur_diffusion.predict import predict
from deblur_diffusion.restorer import Restorer

pytest.importorskip("onnxruntime")

# Sides smaller than the padding (Swintormer with its released window pads to multiples of 128),
# odd, a multiple, and a 2-pixel image.
SIZES = [(2, 3), (61, 77), (128, 128), (131, 300), (17, 9)]


# Restormer's graph, exported by export format=onnx, at sizes of its own: test_export.py.
@pytest.mark.slow
def test_onnx_runtime_restores_like_pytorch_at_every_size_with_the_release_window(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(tmp_path))
    torch.manual_seed(0)
    net = Swintormer(window_size=16, **TINY_UNET).eval()
    graph = cached_graph(net, {"window_size": 16})
    for height, width in SIZES:
        image = torch.rand(2, net.input_channels, height, width)
        with torch.no_grad():
            expected = net(image)
        restored = graph(image)
        assert restored.shape == expected.shape == (2, 3, height, width)
        assert (restored - expected).abs().max() < 1e-4, (height, width)


@pytest.mark.slow
def test_predict_on_a_cpu_runs_onnx_runtime_by_default_exports_once_and_repairs_a_broken_graph(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEBLUR_DIFFUSION_BACKEND")
    torch.manual_seed(0)
    net = Restormer(**TINY_UNET).eval()
    torch.save({"params": net.state_dict()}, tmp_path / "net_g.pth")
    write_image(tmp_path / "photos" / "a.png", np.random.default_rng(0).random((45, 70, 3)), 16)

    def run(output, *overrides):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            predict(
                compose_config(
                    "predict",
                    tmp_path,
                    f"ckpt={tmp_path / 'net_g.pth'}",
                    f"input={tmp_path / 'photos'}",
                    f"output={tmp_path / output}",
                    "device=cpu",
                    *overrides,
                )
            )
        record = json.loads((tmp_path / output / "predict.json").read_text())
        return read_image_raw(tmp_path / output / "a.png").astype(int), record, caplog.text

    reference, record, _ = run("torch", "backend=torch")
    assert record["backend"] == "torch"
    restored, record, log = run("auto")
    assert record["backend"] == "onnxruntime" and "exporting the network to ONNX" in log
    # One line says so; the exporter's own few hundred lines of progress stay out of the console.
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir")) and r.levelno < logging.WARNING]
    assert "[torch.onnx]" not in capsys.readouterr().out
    # 16-bit outputs within 1e-4 of PyTorch: 7 steps of 1/65535.
    assert np.abs(restored - reference).max() <= 7
    (graph,) = (tmp_path / "cache" / "onnx").glob("*/model.onnx")
    exported = graph.stat().st_mtime_ns
    again, _, log = run("again")
    assert "exporting" not in log and graph.stat().st_mtime_ns == exported
    np.testing.assert_array_equal(again, restored)
    graph.write_bytes(b"not a graph")
    repaired, _, log = run("repaired")
    assert "could not be used" in log and "exporting the network to ONNX" in log
    np.testing.assert_array_equal(repaired, restored)


def test_onnx_runtime_asked_for_where_it_cannot_run_names_why():
    net = Restormer(**TINY_UNET)
    with pytest.raises(ConfigError, match="backend=onnxruntime: it runs in fp32, not bf16"):
        Restorer(net, device="cpu", precision="bf16", backend="onnxruntime")
    # auto falls back to PyTorch there.
    assert Restorer(net, device="cpu", precision="bf16", backend="auto").backend == "torch"


def test_auto_falls_back_to_pytorch_when_the_graph_cannot_be_made(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a file where the cache would be"
    blocked.write_text("")
    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(blocked))
    net = Restormer(**TINY_UNET)
    with caplog.at_level(logging.WARNING, logger="deblur_diffusion"):
        assert Restorer(net, device="cpu", backend="auto").backend == "torch"
    assert "restoring through PyTorch: the network's ONNX graph could not be made" in caplog.text
    with pytest.raises(ConfigError, match="backend=onnxruntime: the network's ONNX graph could not be made"):
        Restorer(net, device="cpu", backend="onnxruntime")


def test_auto_exports_a_swintormer_only_when_asked_and_then_uses_its_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBLUR_DIFFUSION_CACHE", str(tmp_path))
    net = Swintormer(window_size=4, **TINY_UNET)
    assert Restorer(net, device="cpu", backend="auto").backend == "torch"
    assert not (tmp_path / "onnx").exists()
    graph = graph_path(net, None)
    graph.parent.mkdir(parents=True)
    graph.write_bytes(b"")  # a graph in the cache: auto now takes ONNX Runtime (loading it is cached_graph's, stubbed)
    monkeypatch.setattr("deblur_diffusion.restorer.cached_graph", lambda net, config: "the cached graph")
    restorer = Restorer(net, device="cpu", backend="auto")
    assert restorer.backend == "onnxruntime" and restorer.forward == "the cached graph"
