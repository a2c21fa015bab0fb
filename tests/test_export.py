"""``export format=official``: the authors' release files, checked against the official files of
the parity fixtures and loaded back through the official-format path."""

import json

import pytest
import torch

from deblur_diffusion.checkpoints import CheckpointError, read_checkpoint
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
from deblur_diffusion.weights import load_network, save_official

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
