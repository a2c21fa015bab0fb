"""Fine-tuning released or trained weights (``model.init_ckpt``): a new run that starts exactly
from the file, reports what does not fit, and widens a first convolution that gains inputs."""

import pytest
import torch
from conftest import FAST_TRAINER, TINY_RESTORMER, TINY_SYNTHETIC, compose_config
from networks import TINY_UNET

from deblur_diffusion.checkpoints import CheckpointError
from deblur_diffusion.models import Restormer
from deblur_diffusion.train import train

# lr 0 and no schedule: one optimisation step leaves the weights where they started.
FROZEN = ["model.optimizer.lr=0.0", "model.scheduler=null", "trainer.max_steps=1", "test=false"]


def run(tmp_path, name, *overrides):
    cfg = compose_config(
        "train",
        tmp_path,
        *TINY_RESTORMER,
        *TINY_SYNTHETIC,
        *FAST_TRAINER,
        *FROZEN,
        "model.ema_decay=0.9",
        *overrides,
        output_dir=tmp_path / name,
    )
    train(cfg)
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)


def official_file(tmp_path, name, **kwargs):
    torch.manual_seed(7)
    net = Restormer(**(TINY_UNET | kwargs))
    torch.save({"params": net.state_dict()}, tmp_path / f"{name}.pth")
    return net.state_dict(), tmp_path / f"{name}.pth"


def weights_under(checkpoint, prefix):
    return {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}


def test_a_run_from_an_official_file_or_another_runs_checkpoint_starts_exactly_there_at_step_0(tmp_path):
    released, path = official_file(tmp_path, "net_g")
    first = run(tmp_path, "from_pth", f"model.init_ckpt={path}")
    assert first["global_step"] == 1  # one step of a new run, not a resumed one
    for prefix in ("net.", "ema.module."):
        weights = weights_under(first, prefix)
        assert weights.keys() == released.keys()
        assert all(torch.equal(weights[key], value) for key, value in released.items()), prefix
    second = run(tmp_path, "from_ckpt", f"model.init_ckpt={tmp_path / 'from_pth' / 'checkpoints' / 'last.ckpt'}")
    assert second["global_step"] == 1
    assert all(torch.equal(weights_under(second, "net.")[key], value) for key, value in released.items())
    # The optimiser is new: its state holds one step, not the previous run's two.
    assert all(state["step"] == 1 for state in second["optimizer_states"][0]["state"].values())


def test_weights_of_another_architecture_fail_naming_the_keys_unless_not_strict(tmp_path):
    _, path = official_file(tmp_path, "other", num_refinement_blocks=2)
    with pytest.raises(
        CheckpointError, match=r"init_ckpt=.*other.pth does not fit Restormer: unexpected 11 keys: refinement.1.*init_strict=false"
    ):
        run(tmp_path, "strict", f"model.init_ckpt={path}")
    checkpoint = run(tmp_path, "lenient", f"model.init_ckpt={path}", "model.init_strict=false")
    assert checkpoint["global_step"] == 1


def test_a_single_image_file_starts_a_dual_pixel_model_with_its_filters_and_zeros(tmp_path, capsys):
    released, path = official_file(tmp_path, "single")
    dual = Restormer(**TINY_UNET, inp_channels=6, dual_pixel_task=True)
    from deblur_diffusion.stages.warm_start import PartWeights, warm_start

    holder = torch.nn.Module()
    holder.net = dual
    with pytest.raises(CheckpointError, match="missing 1 keys: skip_conv.weight"):
        warm_start(holder, [PartWeights("net", str(path), fine_tune=True, strict=True)])
    notes = warm_start(holder, [PartWeights("net", str(path), fine_tune=True, strict=False)])
    first = dual.patch_embed.proj.weight.detach()
    assert torch.equal(first[:, :3], released["patch_embed.proj.weight"])
    assert torch.equal(first[:, 3:], torch.zeros_like(first[:, 3:]))
    assert torch.equal(dual.output.weight.detach(), released["output.weight"])
    assert any("patch_embed.proj.weight" in note and "channels 3-5 start at zero" in note for note in notes)
    assert any("missing 1 keys: skip_conv.weight" in note for note in notes)


def test_a_file_that_is_no_checkpoint_is_named_without_advice_to_run_its_code(tmp_path):
    from PIL import Image

    from deblur_diffusion.checkpoints import read_checkpoint

    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(tmp_path / "photo.png")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'photo.png'} is not a checkpoint of this package or an official release")
    assert "weights_only" not in message and "\n" not in message


def test_a_missing_checkpoint_to_resume_is_named_before_training(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*nowhere.ckpt does not exist"):
        run(tmp_path, "resume", f"ckpt_path={tmp_path / 'nowhere.ckpt'}")


def test_hidiff_stage_one_fine_tunes_from_the_official_files_by_part(parity_dir):
    import json

    from deblur_diffusion.models import HIDiffStageOneNet, LatentEncoder, PriorGuidedRestormer
    from deblur_diffusion.stages import HIDiffStageOne

    folder = parity_dir / "hidiff"
    kwargs = json.loads((folder / "config.json").read_text())["kwargs"]
    net = HIDiffStageOneNet(PriorGuidedRestormer(**kwargs["net_g"]), LatentEncoder(**kwargs["net_le"]))
    files = {"transformer": str(folder / "net_g.pth"), "latent_encoder": str(folder / "net_le.pth")}
    stage = HIDiffStageOne(net, torch.nn.L1Loss(), torch.optim.AdamW, ema_decay=0.9, init_ckpt=files)
    # Nothing widened or left out: each file is reported as loaded into its part, nothing else.
    assert stage.warm_start() == [f"{file} (as net.{part}): loaded into net.{part}" for part, file in files.items()]
    for part, file in files.items():
        released = torch.load(file, weights_only=True)["params"]
        for module in (stage.net, stage.ema.module):
            loaded = module.get_submodule(part).state_dict()
            assert loaded.keys() == released.keys()
            assert all(torch.equal(loaded[key], value) for key, value in released.items()), part
