"""The CompVis LDM-BSR checkpoint as released, through ``load_compvis_ldm``: parity with
fixtures/official_parity/ldm_sr (a tiny random-weight model in the official format, outputs made
with the official code), Lightning-era checkpoints read with ``weights_only=True``, and the
official architecture's parameter counts."""

import json
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from deblur_diffusion.checkpoints import CheckpointError
from deblur_diffusion.models import load_compvis_ldm
from deblur_diffusion.models.compvis_ldm import read_ldm_config, unet_from_ldm, vq_from_ldm

NETWORK_TOLERANCE = 1e-5
SAMPLE_TOLERANCE = 1e-4  # the first DDIM step amplifies float32 reordering noise (meta.json)


@pytest.fixture(scope="module")
def ldm_sr(parity_dir):
    folder = parity_dir / "ldm_sr"
    meta = json.loads((folder / "meta.json").read_text())
    inputs, outputs = (torch.load(folder / f"{name}.pt", weights_only=True) for name in ("inputs", "outputs"))
    return folder, meta, inputs, outputs


def max_error(value, expected):
    return (value.double() - expected.double()).abs().max().item()


@torch.no_grad()
def test_networks_match_the_official_code(ldm_sr):
    folder, _, inputs, outputs = ldm_sr
    ema = load_compvis_ldm(folder / "model.ckpt", folder / "config.yaml")
    raw = load_compvis_ldm(folder / "model.ckpt", folder / "config.yaml", use_ema=False)
    assert max_error(raw.predict_noise(inputs["x_t"], inputs["t"], inputs["condition"]), outputs["eps"]) < NETWORK_TOLERANCE
    assert max_error(ema.predict_noise(inputs["x_t"], inputs["t"], inputs["condition"]), outputs["eps_ema"]) < NETWORK_TOLERANCE
    assert max_error(ema.encode(inputs["image"]), outputs["encoded"]) < NETWORK_TOLERANCE
    assert max_error(ema.quantize(outputs["encoded"]), outputs["encoded_quantized"]) < NETWORK_TOLERANCE
    assert max_error(ema.decode(inputs["latent"]), outputs["decoded"]) < NETWORK_TOLERANCE
    assert max_error(ema.decode(inputs["latent"], force_not_quantize=True), outputs["decoded_not_quantized"]) < NETWORK_TOLERANCE


@torch.no_grad()
def test_ddim_sampling_matches_the_official_sampler(ldm_sr):
    folder, meta, inputs, outputs = ldm_sr
    model = load_compvis_ldm(folder / "model.ckpt", folder / "config.yaml")
    timesteps, alphas, alphas_prev, _ = model.ddim_schedule(meta["S"], 0.0)
    assert torch.equal(timesteps, outputs["ddim_timesteps"]) and torch.equal(timesteps.flip(0), outputs["ddim_step_t"])
    for value, name in ((alphas, "ddim_alphas"), (alphas_prev, "ddim_alphas_prev"), (model.alphas_cumprod, "alphas_cumprod")):
        assert max_error(value, outputs[name]) < 1e-7, name
    sample = model.sample(inputs["condition"], meta["S"], eta=0.0, x_T=inputs["x_T"])
    assert max_error(sample, outputs["ddim_eta0"]) < SAMPLE_TOLERANCE
    tiled = model.sample(inputs["condition"], meta["S"], eta=0.0, x_T=inputs["x_T"], tiles=meta["split_input_params"])
    assert max_error(tiled, outputs["ddim_eta0_tiled"]) < SAMPLE_TOLERANCE


def write_lightning_era_checkpoint(folder, path):
    """A checkpoint shaped like one written by Lightning 1.x: training state, and the callbacks'
    state keyed by the callback class itself (so the pickle names a Lightning class)."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    callback_class = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = callback_class
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__)
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(
        {
            "pytorch_lightning": types.ModuleType("pytorch_lightning"),
            "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"),
            module.__name__: module,
        }
    )
    try:
        state = torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]
        torch.save(
            {
                "epoch": 3,
                "global_step": 12345,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {callback_class: {"best_model_score": torch.tensor(0.1, dtype=torch.float64)}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999), "params": [0]}]}],
                "state_dict": state,
            },
            path,
        )
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def test_a_lightning_era_checkpoint_loads_with_weights_only(ldm_sr, tmp_path):
    folder, _, inputs, outputs = ldm_sr
    path = tmp_path / "model.ckpt"
    write_lightning_era_checkpoint(folder, path)
    with pytest.raises(Exception, match="ModelCheckpoint"):
        torch.load(path, weights_only=True)
    model = load_compvis_ldm(path, folder / "config.yaml")
    with torch.no_grad():
        assert max_error(model.predict_noise(inputs["x_t"], inputs["t"], inputs["condition"]), outputs["eps_ema"]) < NETWORK_TOLERANCE


def test_files_that_do_not_fit_are_named(ldm_sr, tmp_path):
    folder, _, _, _ = ldm_sr
    state = torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]
    without_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    torch.save({"state_dict": without_ema}, tmp_path / "raw_only.ckpt")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_compvis_ldm(tmp_path / "raw_only.ckpt", folder / "config.yaml")
    config = OmegaConf.load(folder / "config.yaml")
    config.model.params.unet_config.params.model_channels = 64
    OmegaConf.save(config, tmp_path / "other.yaml")
    with pytest.raises(CheckpointError, match=r"does not fit UNet2DModel: .*wrong shape"):
        load_compvis_ldm(folder / "model.ckpt", tmp_path / "other.yaml")


OFFICIAL_LDM_BSR = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "unet_config": {
                "params": {
                    "image_size": 64,
                    "in_channels": 6,
                    "out_channels": 3,
                    "model_channels": 160,
                    "attention_resolutions": [16, 8],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 2, 4],
                    "num_head_channels": 32,
                }
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.VQModelInterface",
                "params": {
                    "embed_dim": 3,
                    "n_embed": 8192,
                    "ddconfig": {
                        "double_z": False,
                        "z_channels": 3,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                },
            },
        },
    }
}


def test_the_official_configuration_has_the_official_parameter_counts(tmp_path):
    OmegaConf.save(OmegaConf.create(OFFICIAL_LDM_BSR), tmp_path / "config.yaml")
    params = read_ldm_config(tmp_path / "config.yaml")
    with torch.device("meta"):
        unet, _ = unet_from_ldm(params["unet_config"]["params"])
        first_stage = vq_from_ldm(params["first_stage_config"]["params"])
    # The released LDM-BSR model.ckpt: the model_ema UNet and the VQ first stage.
    assert sum(p.numel() for p in unet.parameters()) == 113_622_563
    assert sum(p.numel() for p in first_stage.parameters()) == 55_322_782


@torch.no_grad()
def test_the_official_prior_is_the_clamped_raw_latent_of_the_full_resolution_condition(ldm_sr):
    folder, meta, inputs, outputs = ldm_sr
    model = load_compvis_ldm(folder / "model.ckpt", folder / "config.yaml")
    model.eta = 0.0
    model.condition_multiple = 8  # the fixture's 32 px condition is not padded (the official 128 would)
    blurry = (inputs["condition"] + 1) / 2  # the image whose [-1, 1] version is the fixture's condition
    model.split_input = meta["split_input_params"] | {"ks": (32, 32)}  # one tile: the plain DDIM run
    prior = model.official_prior(blurry, steps=meta["S"], x_T=inputs["x_T"])
    assert prior.shape == blurry.shape
    assert max_error(prior, (outputs["ddim_eta0"].clamp(-1, 1) + 1) / 2) < SAMPLE_TOLERANCE
    model.split_input = meta["split_input_params"]  # 16 px tiles every 8: the split-input run
    tiled = model.official_prior(blurry, steps=meta["S"], x_T=inputs["x_T"])
    assert max_error(tiled, (outputs["ddim_eta0_tiled"].clamp(-1, 1) + 1) / 2) < SAMPLE_TOLERANCE


@pytest.mark.slow
def test_the_official_chain_runs_end_to_end_on_the_tiny_fixture_model(ldm_sr, tmp_path):
    from conftest import FAST_TRAINER, run_cli
    from networks import prior_fused_swintormer_overrides

    folder = ldm_sr[0]
    assert (
        run_cli("data.synthesize", f"out={tmp_path}/GoPro", "train_pairs=4", "test_pairs=2", "image_size=40", cwd=tmp_path).returncode == 0
    )
    for split in ("train", "val", "test"):
        made = run_cli(
            "generate_prior",
            f"ckpt={folder / 'model.ckpt'}",
            f"ldm_config={folder / 'config.yaml'}",
            "data=gopro",
            f"paths.data_dir={tmp_path}",
            f"split={split}",
            f"out={tmp_path}/priors",
            "steps=2",
            cwd=tmp_path,
        )
        assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((tmp_path / "priors" / "train" / "manifest.json").read_text())
    assert manifest["prior"] == "official" and len(manifest["priors"]) == 4
    trained = run_cli(
        "train",
        *prior_fused_swintormer_overrides(tmp_path, tmp_path / "priors"),
        *FAST_TRAINER,
        "test=false",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_cli(
        "evaluate",
        f"ckpt={tmp_path}/run/checkpoints/last.ckpt",
        "data=gopro",
        f"paths.data_dir={tmp_path}",
        f"data.prior_dir={tmp_path}/priors",
        "inference=swintormer_release",
        "inference.tile_size=32",
        "inference.stride=16",
        "lpips=false",
        f"hydra.run.dir={tmp_path}/eval",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]["all"]["images"] == 2


def test_summary_shows_the_released_counts_beside_the_official_config(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from rich.console import Console

    from deblur_diffusion.cli import config_dir
    from deblur_diffusion.summary import summary_table

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("summary", overrides=["model=ldm_prior"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    console = Console(width=200, record=True)
    console.print(summary_table(model, 64, 64, 3))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert rows["unet"].count("113,622,563") == 2 and rows["autoencoder"].count("55,322,782") == 2


@torch.no_grad()
def test_the_online_prior_loads_the_released_checkpoint(ldm_sr):
    from deblur_diffusion.models import LatentPriorModel, PriorFusedNet, Swintormer
    from deblur_diffusion.stages import PriorFusedStage

    folder, _, inputs, outputs = ldm_sr
    params = read_ldm_config(folder / "config.yaml")
    unet, _ = unet_from_ldm(params["unet_config"]["params"])
    prior = LatentPriorModel(vq_from_ldm(params["first_stage_config"]["params"]), unet, prior="official", sampling_steps=2)
    restorer = Swintormer(inp_channels=6, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], window_size=4)
    stage = PriorFusedStage(
        PriorFusedNet(prior, restorer),
        torch.nn.L1Loss(),
        torch.optim.AdamW,
        prior_ckpt=str(folder / "model.ckpt"),
        prior_ldm_config=str(folder / "config.yaml"),
    )
    # Built from the config alone, as a resumed run builds it (the schedule is not in checkpoints).
    assert max_error(stage.net.prior.alphas_cumprod, outputs["alphas_cumprod"]) == 0
    stage.warm_start()
    eps = stage.net.prior.predict_noise(inputs["x_t"], inputs["t"], inputs["condition"])
    assert max_error(eps, outputs["eps_ema"]) < NETWORK_TOLERANCE
    assert max_error(stage.net.prior.alphas_cumprod, outputs["alphas_cumprod"]) == 0
    assert stage.net(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_generate_prior_batches_images_of_one_size_without_changing_their_priors(ldm_sr, tmp_path, monkeypatch):
    import numpy as np
    from conftest import compose_config

    from deblur_diffusion import generate_prior
    from deblur_diffusion.data.io import read_image_raw, write_image
    from deblur_diffusion.models.latent_prior import LatentPriorModel

    folder = ldm_sr[0]
    rng = np.random.default_rng(0)
    # Sorted by name: two 40x40, one 32x48, two 40x40 -> with batch_size 2, batches of 2, 1, 2.
    for name, shape in (("a", (40, 40)), ("b", (40, 40)), ("c", (32, 48)), ("d", (40, 40)), ("e", (40, 40))):
        write_image(tmp_path / "blurry" / f"{name}.png", rng.random((*shape, 3)), 8)
    unet_batches, manifest_writes = [], []
    write_manifest, predict_noise = generate_prior.write_manifest, LatentPriorModel.predict_noise

    def counting_write_manifest(path, manifest):
        manifest_writes.append(path)
        return write_manifest(path, manifest)

    def counting_predict_noise(model, x_t, *args):
        unet_batches.append(len(x_t))
        return predict_noise(model, x_t, *args)

    monkeypatch.setattr(generate_prior, "write_manifest", counting_write_manifest)
    monkeypatch.setattr(LatentPriorModel, "predict_noise", counting_predict_noise)
    priors = {}
    for batch_size in (1, 2):
        cfg = compose_config(
            "generate_prior",
            tmp_path,
            f"ckpt={folder / 'model.ckpt'}",
            f"ldm_config={folder / 'config.yaml'}",
            f"input={tmp_path / 'blurry'}",
            f"out={tmp_path / f'batch{batch_size}'}",
            "steps=2",
            f"batch_size={batch_size}",
            "data.num_workers=0",
            "device=cpu",
        )
        unet_batches.clear()
        manifest_writes.clear()
        assert generate_prior.generate_priors(cfg) == (5, 0)
        priors[batch_size] = {name: read_image_raw(tmp_path / f"batch{batch_size}" / f"{name}.png") for name in "abcde"}
        assert len(manifest_writes) == {1: 5, 2: 3}[batch_size] + 2  # once before, once per batch, once at the end
    assert set(unet_batches) == {1, 2}
    for name in "abcde":
        # 7 / 65535 ~ 1e-4: float32 reordering noise of a batched UNet call, amplified by DDIM.
        assert np.abs(priors[1][name].astype(int) - priors[2][name].astype(int)).max() <= 7, name


def test_prior_batches_hold_one_size_and_at_most_the_pixel_bound():
    from deblur_diffusion.generate_prior import same_size_batches

    images = [(i, torch.zeros(3, *size)) for i, size in enumerate([(4, 4)] * 5 + [(4, 8)] * 2 + [(8, 8)])]
    assert [indices for indices, _ in same_size_batches(images, 3)] == [[0, 1, 2], [3, 4], [5, 6], [7]]
    # 40 pixels: two 4x4 images, one 4x8, and a single 8x8 image above the bound still goes alone.
    assert [indices for indices, _ in same_size_batches(images, 3, max_pixels=40)] == [[0, 1], [2, 3], [4], [5], [6], [7]]


def test_generate_prior_records_what_made_its_priors_and_trusts_nothing_else(ldm_sr, tmp_path):
    import hashlib

    import numpy as np
    from conftest import compose_config

    from deblur_diffusion.data.io import read_image_raw, write_image
    from deblur_diffusion.errors import ConfigError
    from deblur_diffusion.generate_prior import generate_priors

    folder = ldm_sr[0]
    rng = np.random.default_rng(0)
    for name in "abc":
        write_image(tmp_path / "blurry" / f"{name}.png", rng.random((32, 32, 3)), 8)
    out = tmp_path / "priors"

    def run(*overrides):
        common = [f"ckpt={folder / 'model.ckpt'}", f"ldm_config={folder / 'config.yaml'}", f"input={tmp_path / 'blurry'}"]
        return generate_priors(
            compose_config("generate_prior", tmp_path, *common, f"out={out}", "data.num_workers=0", "batch_size=1", *overrides)
        )

    write_image(out / "a.png", rng.random((32, 32, 3)), 16)  # a prior image nothing vouches for
    with pytest.raises(ConfigError, match=r"1 prior images \(e.g. a.png\) but no manifest.json"):
        run("steps=2")
    (out / "a.png").unlink()
    assert run("steps=2") == (3, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ckpt_sha256"] == hashlib.sha256((folder / "model.ckpt").read_bytes()).hexdigest()
    assert manifest["ldm_config_sha256"] == hashlib.sha256((folder / "config.yaml").read_bytes()).hexdigest()
    assert manifest["inference"]["split_input"]["ks"] == [128, 128] and manifest["inference"]["self_ensemble"] is False
    assert sorted(manifest["priors"]) == ["a", "b", "c"]
    # A run killed after writing b.png but before listing it: b is written again, a and c kept.
    expected_b = read_image_raw(out / "b.png")
    del manifest["priors"]["b"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "b.png").write_bytes(b"not a whole image")
    assert run("steps=2") == (1, 2)
    assert np.array_equal(read_image_raw(out / "b.png"), expected_b)
    with pytest.raises(ConfigError, match="steps: 2 -> 3"):
        run("steps=3")
    with pytest.raises(ConfigError, match="inference: .*self_ensemble"):
        run("steps=2", "inference.self_ensemble=true")


def test_generate_prior_takes_the_released_files_from_their_urls(ldm_sr, tmp_path, serve_folder):
    """The released LDM-BSR's model.ckpt and config.yaml by URL (a server on 127.0.0.1), as
    predict's ckpt= takes them: downloaded once, checked by ckpt_sha256=, recorded by content."""
    import hashlib

    import numpy as np
    from conftest import compose_config

    from deblur_diffusion.data.io import write_image
    from deblur_diffusion.downloads import DownloadError
    from deblur_diffusion.generate_prior import generate_priors

    folder = ldm_sr[0]
    base = serve_folder(folder)
    write_image(tmp_path / "blurry" / "a.png", np.random.default_rng(0).random((32, 32, 3)), 8)
    digest = hashlib.sha256((folder / "model.ckpt").read_bytes()).hexdigest()

    def run(*overrides):
        common = [f"ckpt={base}/model.ckpt", f"ldm_config={base}/config.yaml", f"input={tmp_path / 'blurry'}"]
        return generate_priors(
            compose_config("generate_prior", tmp_path, *common, f"out={tmp_path / 'priors'}", "data.num_workers=0", "steps=2", *overrides)
        )

    with pytest.raises(DownloadError, match=f"has SHA-256 {digest}, not the expected 00ff"):
        run("ckpt_sha256=00ff")
    assert run(f"ckpt_sha256={digest}") == (1, 0)
    manifest = json.loads((tmp_path / "priors" / "manifest.json").read_text())
    assert manifest["ckpt"] == f"{base}/model.ckpt" and manifest["ckpt_sha256"] == digest
    assert manifest["ldm_config_sha256"] == hashlib.sha256((folder / "config.yaml").read_bytes()).hexdigest()


def test_generate_prior_refuses_dual_pixel_views_for_the_combined_one(ldm_sr, tmp_path):
    from conftest import compose_config

    from deblur_diffusion.errors import ConfigError
    from deblur_diffusion.generate_prior import generate_priors

    folder = ldm_sr[0]
    overrides = [f"ckpt={folder / 'model.ckpt'}", f"ldm_config={folder / 'config.yaml'}", "data=dpdd_dual", f"out={tmp_path / 'p'}"]
    with pytest.raises(ConfigError, match="combined view.*data=dpdd "):
        generate_priors(compose_config("generate_prior", tmp_path, *overrides))
