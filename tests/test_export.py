"""``export format=official``: the authors' release files, checked against the official files of
the parity fixtures and loaded back through the official-format path."""

import json

import pytest
import torch

from deblur_diffusion.checkpoints import CheckpointError, read_checkpoint
from deblur_diffusion.export import save_official
from deblur_diffusion.models import (
    HIDiff,
    HIDiffStageOneNet,
    LatentEncoder,
    LatentPriorModel,
    MixerDenoiser,
    PriorDiffusion,
    PriorGuidedRestormer,
    Restormer,
    Swintormer,
)
from deblur_diffusion.weights import load_network

TARGETS = {
    "restormer": "deblur_diffusion.models.Restormer",
    "restormer_dual_pixel": "deblur_diffusion.models.Restormer",
    "swintormer": "deblur_diffusion.models.Swintormer",
}
CLASSES = {"restormer": Restormer, "restormer_dual_pixel": Restormer, "swintormer": Swintormer}


def fixture_kwargs(parity_dir, name):
    return json.loads((parity_dir / name / "config.json").read_text())["kwargs"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_an_official_export_has_the_official_files_keys_and_loads_back(tmp_path, parity_dir, name):
    kwargs = fixture_kwargs(parity_dir, name)
    torch.manual_seed(0)
    net = CLASSES[name](**kwargs).eval()
    (written,) = save_official(net, tmp_path)
    assert written.name == "net_g.pth"
    ours = read_checkpoint(written)
    official = read_checkpoint(parity_dir / name / "net_g.pth")
    assert set(ours) == {"params"}
    assert {k: v.shape for k, v in ours["params"].items()} == {k: v.shape for k, v in official["params"].items()}
    loaded = load_network(written, {"_target_": TARGETS[name], **kwargs}).net.eval()
    image = torch.rand(1, kwargs["inp_channels"], 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), net(image), rtol=0, atol=0)


def hidiff_parts(parity_dir):
    kwargs = fixture_kwargs(parity_dir, "hidiff")
    torch.manual_seed(0)
    return (
        kwargs,
        PriorGuidedRestormer(**kwargs["net_g"]),
        LatentEncoder(**kwargs["net_le"]),
        LatentEncoder(**kwargs["net_le_dm"]),
        MixerDenoiser(**kwargs["net_d"]),
    )


def test_hidiff_exports_the_three_official_files_of_stage_two_and_the_two_of_stage_one(tmp_path, parity_dir):
    kwargs, transformer, latent_encoder, condition_encoder, denoiser = hidiff_parts(parity_dir)
    schedule = kwargs["diffusion_schedule"]
    diffusion = PriorDiffusion(schedule["timesteps"], schedule["linear_start"], schedule["linear_end"])
    stage_two = HIDiff(transformer, condition_encoder, denoiser, diffusion).eval()
    written = save_official(stage_two, tmp_path / "s2")
    assert sorted(path.name for path in written) == ["net_d.pth", "net_g.pth", "net_le_dm.pth"]
    for path in written:
        ours = read_checkpoint(path)["params"]
        official = read_checkpoint(parity_dir / "hidiff" / path.name)["params"]
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}, path.name
    written = save_official(HIDiffStageOneNet(transformer, latent_encoder), tmp_path / "s1")
    assert sorted(path.name for path in written) == ["net_g.pth", "net_le.pth"]
    config = {
        "_target_": "deblur_diffusion.models.hidiff.HIDiff",
        "transformer": {"_target_": "deblur_diffusion.models.PriorGuidedRestormer", **kwargs["net_g"]},
        "condition_encoder": {"_target_": "deblur_diffusion.models.LatentEncoder", **kwargs["net_le_dm"]},
        "denoiser": {"_target_": "deblur_diffusion.models.MixerDenoiser", **kwargs["net_d"]},
        "diffusion": {
            "_target_": "deblur_diffusion.models.PriorDiffusion",
            "timesteps": schedule["timesteps"],
            "linear_start": schedule["linear_start"],
            "linear_end": schedule["linear_end"],
        },
    }
    files = {part: str(tmp_path / "s2" / f"{stem}.pth") for part, stem in HIDiff.official_files.items()}
    loaded = load_network(files, config).net.eval()
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), stage_two(image), rtol=0, atol=0)


def test_a_network_without_an_official_format_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no official release format"):
        save_official(LatentPriorModel.__new__(LatentPriorModel), tmp_path)


def stage_checkpoint(tmp_path, ema_decay):
    """A checkpoint of this package (as train writes it) whose EMA differs from its raw weights."""
    from networks import TINY_CONFIGS, tiny_network

    from deblur_diffusion.stages import RegressionStage

    stage = RegressionStage(tiny_network("restormer"), torch.nn.L1Loss(), torch.optim.AdamW, ema_decay=ema_decay)
    if stage.ema is not None:
        with torch.no_grad():
            for parameter in stage.ema.parameters():
                parameter.add_(0.01)
    checkpoint = {"state_dict": stage.state_dict()}
    stage.run_config = {"model": {"net": TINY_CONFIGS["restormer"]}}
    stage.on_save_checkpoint(checkpoint)
    path = tmp_path / f"ema_{ema_decay}.ckpt"
    torch.save(checkpoint, path)
    return stage, path


def test_official_export_keeps_the_raw_params_and_the_ema_as_params_ema(tmp_path):
    from deblur_diffusion.export import export_official

    stage, path = stage_checkpoint(tmp_path, ema_decay=0.999)
    (written,) = export_official(path, tmp_path / "with_ema")
    release = read_checkpoint(written)
    assert set(release) == {"params", "params_ema"}
    for key, value in stage.net.state_dict().items():
        assert torch.equal(release["params"][key], value), key
    for key, value in stage.ema.module.state_dict().items():
        assert torch.equal(release["params_ema"][key], value), key
    stage, path = stage_checkpoint(tmp_path, ema_decay=None)
    (written,) = export_official(path, tmp_path / "raw")
    assert set(read_checkpoint(written)) == {"params"}


@pytest.mark.parametrize("ema", [True, False])
def test_a_safetensors_export_holds_the_chosen_weights_and_says_which(tmp_path, ema):
    from safetensors.torch import load_file

    from deblur_diffusion.export import export

    stage, path = stage_checkpoint(tmp_path, ema_decay=0.999)
    out = export(path, tmp_path / "export", ema=ema)
    expected = (stage.ema.module if ema else stage.net).state_dict()
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[key], value) for key, value in expected.items())
    loaded = load_network(out)
    assert loaded.weights == ("ema" if ema else "raw")


@pytest.mark.slow
# Swintormer's graph, with the release's window, in test_onnx_runtime.py.
def test_an_onnx_export_runs_at_any_size_as_pytorch(tmp_path, parity_dir):
    onnxruntime = pytest.importorskip("onnxruntime")
    from deblur_diffusion.export import export_onnx

    weights = parity_dir / "restormer_dual_pixel" / "net_g.pth"
    path, checked = export_onnx(weights, tmp_path)
    assert path.name == "model.onnx" and checked < 1e-4
    net = load_network(weights).net.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = ((net.size_multiple + 11, 2 * net.size_multiple - 3), (3 * net.size_multiple, max(16, net.size_multiple)), (2, 3), (5, 7))
    for height, width in sizes:
        image = torch.rand(1, net.input_channels, height, width)
        with torch.no_grad():
            expected = net(image).numpy()
        restored = session.run(None, {"blurry": image.numpy()})[0]
        assert restored.shape == expected.shape == (1, 3, height, width)
        assert abs(restored - expected).max() < 1e-4


def test_onnx_refuses_a_diffusion_model_naming_why(tmp_path, parity_dir):
    from networks import official_hidiff_config

    from deblur_diffusion.errors import ConfigError
    from deblur_diffusion.export import export_onnx

    kwargs, transformer, _, condition_encoder, denoiser = hidiff_parts(parity_dir)
    net = HIDiff(transformer, condition_encoder, denoiser, PriorDiffusion(4))
    files = save_official(net, tmp_path / "s2")
    config = official_hidiff_config(kwargs, timesteps=4)
    parts = {part: str(tmp_path / "s2" / f"{stem}.pth") for part, stem in HIDiff.official_files.items()}
    assert len(files) == 3
    with pytest.raises(ConfigError, match="HIDiff is not exported to ONNX: .*samples seeded noise over T network calls"):
        export_onnx(parts, tmp_path / "onnx", config)
    assert not (tmp_path / "onnx").exists()


def test_spandrel_loads_an_official_export_and_takes_its_ema(tmp_path):
    # spandrel (what chaiNNer and ComfyUI load models with) is an independent reader of the format.
    spandrel = pytest.importorskip("spandrel")
    extra = pytest.importorskip("spandrel_extra_arches")
    extra.install()
    from deblur_diffusion.export import export_official

    stage, path = stage_checkpoint(tmp_path, ema_decay=0.999)
    (written,) = export_official(path, tmp_path / "release")
    described = spandrel.ModelLoader().load_from_file(written)
    assert described.architecture.name == "Restormer" and described.input_channels == 3
    image = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(described.model.eval()(image), stage.ema.module.eval()(image), rtol=0, atol=1e-5)
