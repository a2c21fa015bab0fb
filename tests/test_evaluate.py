"""Metrics and protocols, the loaders of every checkpoint kind, and the evaluate / predict / export CLIs."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblur_diffusion import load_pretrained
from deblur_diffusion.checkpoints import CheckpointError
from deblur_diffusion.data.io import read_image_raw, write_image
from deblur_diffusion.errors import DeblurError
from deblur_diffusion.export import export
from deblur_diffusion.inference import Inference
from deblur_diffusion.metrics import LPIPS, LPIPSUnavailableError, align_realblur, psnr, realblur_ssim, ssim
from deblur_diffusion.models import Restormer
from deblur_diffusion.weights import load_network

TINY_RESTORMER_KWARGS = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])
TINY_RESTORMER_OVERRIDES = [
    "model=restormer",
    "model.net.dim=8",
    "model.net.num_blocks=[1,1,1,1]",
    "model.net.num_refinement_blocks=1",
    "model.net.heads=[1,1,1,1]",
]


def nchw(image):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


def real_pair():
    sharp = skdata.astronaut()[100:228, 150:278].astype(np.float32) / 255
    blurry = cv2.GaussianBlur(sharp, (7, 7), 2.0)
    return blurry, sharp


@pytest.mark.parametrize("kind", ["random", "real"])
def test_psnr_and_ssim_agree_with_scikit_image(kind, rng):
    if kind == "random":
        target = rng.random((40, 57, 3)).astype(np.float32)
        restored = np.clip(target + rng.normal(0, 0.08, target.shape), 0, 1).astype(np.float32)
    else:
        restored, target = real_pair()
    expected_ssim = structural_similarity(
        target.astype(np.float64),
        restored.astype(np.float64),
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        data_range=1.0,
        use_sample_covariance=False,
    )
    assert ssim(nchw(restored), nchw(target)).item() == pytest.approx(expected_ssim, abs=1e-9)
    assert psnr(nchw(restored), nchw(target)).item() == pytest.approx(peak_signal_noise_ratio(target, restored, data_range=1.0), abs=1e-4)


def test_masked_metrics_follow_the_realblur_formulas(rng):
    restored, target = real_pair()
    mask = np.ones_like(target)
    mask[:, :9] = 0
    error = np.sum((target * mask - restored * mask) ** 2, dtype=np.float64) / mask.sum()
    assert psnr(nchw(restored * mask), nchw(target * mask), nchw(mask)).item() == pytest.approx(10 * np.log10(1 / error), abs=1e-6)
    _, full = structural_similarity(
        target * mask,
        restored * mask,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    inner, inner_mask = (full * mask)[5:-5, 5:-5], mask[5:-5, 5:-5]
    expected = np.mean(inner.sum(axis=(0, 1)) / inner_mask.sum(axis=(0, 1)))
    assert realblur_ssim(restored * mask, target * mask, mask) == pytest.approx(expected, abs=1e-7)


def test_realblur_alignment_recovers_a_small_shift():
    target = skdata.astronaut()[80:240, 120:280].astype(np.float32) / 255
    shift = np.float32([[1, 0, 2.0], [0, 1, -1.0]])
    shifted = cv2.warpAffine(target, shift, (target.shape[1], target.shape[0]), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    before = psnr(nchw(shifted), nchw(target)).item()
    aligned, masked_target, mask = align_realblur(shifted, target)
    after = psnr(nchw(aligned), nchw(masked_target), nchw(mask)).item()
    assert after > before + 10, (before, after)
    assert 0.9 < mask.mean() < 1.0


def test_lpips_downloads_its_backbone_through_torchvision_or_says_why_it_cannot(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    asked = []

    def offline(url, destination, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(LPIPSUnavailableError, match=r"not at .*alexnet-owt-7be5be79\.pth and could not be downloaded \(no network"):
        LPIPS()(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert asked == [torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url]

    def online(url, destination, *args, **kwargs):  # the download torchvision asks for, served locally
        torch.save(torchvision.models.alexnet().state_dict(), destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", online)
    distance = LPIPS()(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert distance.shape == (1,) and distance.item() > 0
    assert (tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").is_file()


def test_self_ensemble_averages_the_eight_flips_and_transposes():
    image = torch.rand(1, 3, 6, 6)
    ramp = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6)

    def position_dependent(x):
        return x * ramp

    expected = torch.zeros_like(image)
    array = image[0].numpy()
    for transposed in (False, True):
        for k in range(4):
            view = np.rot90(array.transpose(0, 2, 1) if transposed else array, k, axes=(1, 2))
            out = np.rot90(view * ramp[0].numpy(), -k, axes=(1, 2))
            expected += torch.from_numpy(np.ascontiguousarray(out.transpose(0, 2, 1) if transposed else out))[None] / 8
    torch.testing.assert_close(Inference(self_ensemble=True)(position_dependent, image), expected)
    identity = Inference(mode="tiles", tile_size=4, stride=3, self_ensemble=True)(lambda x: x, image)
    torch.testing.assert_close(identity, image)


@pytest.mark.parametrize(
    "name, builder",
    [("restormer", "restormer"), ("restormer_dual_pixel", "restormer"), ("swintormer", "swintormer")],
)
def test_official_files_load_through_the_user_path(parity_dir, name, builder):
    folder = parity_dir / name
    net_config = {
        "_target_": f"deblur_diffusion.models.{builder.capitalize()}",
        **json.loads((folder / "config.json").read_text())["kwargs"],
    }
    lq = torch.load(folder / "inputs.pt", weights_only=True)["lq"]
    expected = torch.load(folder / "outputs.pt", weights_only=True)["out"]
    loaded = load_network(folder / "net_g.pth", net_config)
    with torch.no_grad():
        assert (loaded.net.eval()(lq) - expected).abs().max().item() < 1e-5
    restored = load_pretrained(folder / "net_g.pth", net_config).restore(lq)
    assert (restored - expected.clamp(0, 1)).abs().max().item() < 1e-5


# The official file of each HI-Diff part (its test option files' network_g, network_le_dm, ...).
HIDIFF_STAGE_TWO_PARTS = {"transformer": "net_g", "condition_encoder": "net_le_dm", "denoiser": "net_d"}
HIDIFF_STAGE_ONE_PARTS = {"transformer": "net_g", "latent_encoder": "net_le"}


def official_hidiff_files(folder, parts):
    return {part: str(folder / f"{name}.pth") for part, name in parts.items()}


@pytest.mark.parametrize("kind, noise", [("hidiff", "noise"), ("hidiff_realblur", "noise_test")])
def test_official_hidiff_files_load_with_no_config_and_reproduce_the_official_outputs(parity_dir, kind, noise):
    folder = parity_dir / kind
    fixture = json.loads((folder / "config.json").read_text())
    timesteps = fixture["kwargs"]["diffusion_schedule"]["timesteps"]
    inputs, outputs = (torch.load(folder / f"{n}.pt", weights_only=True) for n in ("inputs", "outputs"))
    # The fixtures shrink T; only the schedule's length is given, the rest is read off the weights.
    loaded = load_network(official_hidiff_files(folder, HIDIFF_STAGE_TWO_PARTS), {"diffusion": {"timesteps": timesteps}})
    for part, name in (("transformer", "net_g"), ("condition_encoder", "net_le_dm"), ("denoiser", "net_d")):
        read = loaded.net_config[part]
        assert {key: read[key] for key in fixture["kwargs"][name]} == fixture["kwargs"][name], part
    net = loaded.net.eval()
    with torch.no_grad():
        assert (net(inputs["lq"], net.sample_prior(inputs["lq"], inputs[noise])) - outputs["out_stage2"]).abs().max() < 1e-5
    stage_one = load_network(official_hidiff_files(folder, HIDIFF_STAGE_ONE_PARTS)).net.eval()
    with torch.no_grad():
        assert (stage_one(torch.cat([inputs["lq"], inputs["gt"]], dim=1)) - outputs["out_stage1"]).abs().max() < 1e-5


def test_hidiff_files_get_their_release_schedule_and_refuse_foreign_parts(parity_dir, tmp_path):
    gopro = load_network(official_hidiff_files(parity_dir / "hidiff", HIDIFF_STAGE_TWO_PARTS)).net.diffusion
    realblur = load_network(official_hidiff_files(parity_dir / "hidiff_realblur", HIDIFF_STAGE_TWO_PARTS)).net.diffusion
    # GoPro_S2.yml: T = 8, betas evenly spaced; RealBlur_J_S2.yml: T = 16, LDM's scaled betas, x0.
    assert (gopro.timesteps, gopro.schedule, gopro.prediction) == (8, "linear", "eps")
    assert (realblur.timesteps, realblur.schedule, realblur.prediction, realblur.clip_x0) == (16, "scaled_linear", "x0", False)
    with pytest.raises(CheckpointError, match=r"the parts \['transformer'\] are no model"):
        load_network({"transformer": parity_dir / "hidiff" / "net_g.pth"})
    mixed = {**official_hidiff_files(parity_dir / "hidiff", HIDIFF_STAGE_TWO_PARTS)}
    state = torch.load(parity_dir / "hidiff" / "net_le_dm.pth", weights_only=True)["params"]
    state["end.0.weight"], state["end.0.bias"] = torch.zeros(64, 8), torch.zeros(64)
    torch.save({"params": state}, tmp_path / "wide.pth")
    mixed["condition_encoder"] = str(tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"wide.pth gives 64-wide prior tokens but .*net_g.pth integrates 32-wide"):
        load_network(mixed)
    with pytest.raises(CheckpointError, match=r"\['steps'\] are not arguments of the HI-Diff.diffusion"):
        load_network(official_hidiff_files(parity_dir / "hidiff", HIDIFF_STAGE_TWO_PARTS), {"diffusion": {"steps": 4}})


def test_a_file_of_another_architecture_is_named_by_its_keys(parity_dir):
    config = {"_target_": "deblur_diffusion.models.Restormer", **TINY_RESTORMER_KWARGS}
    with pytest.raises(CheckpointError, match=r"net_g\.pth \(params\) does not fit Restormer: missing .* keys: .*unexpected"):
        load_network(parity_dir / "swintormer" / "net_g.pth", config)


# The window, which no weight holds, is the one argument a released Swintormer file needs besides
# itself when it is not the released 16.
NOT_IN_WEIGHTS = {"restormer": None, "restormer_dual_pixel": None, "swintormer": {"window_size": 4}}


@pytest.mark.parametrize("name", list(NOT_IN_WEIGHTS))
def test_an_official_file_loads_with_no_config_and_reproduces_the_official_outputs(parity_dir, name):
    folder = parity_dir / name
    official_kwargs = json.loads((folder / "config.json").read_text())["kwargs"]
    loaded = load_network(folder / "net_g.pth", NOT_IN_WEIGHTS[name])
    read = {key: value for key, value in loaded.net_config.items() if key != "_target_"}
    assert {key: read[key] for key in official_kwargs} == official_kwargs
    lq = torch.load(folder / "inputs.pt", weights_only=True)["lq"]
    expected = torch.load(folder / "outputs.pt", weights_only=True)["out"]
    with torch.no_grad():
        assert (loaded.net.eval()(lq) - expected).abs().max().item() < 1e-5
    restored = load_pretrained(folder / "net_g.pth", NOT_IN_WEIGHTS[name]).restore(lq)
    assert (restored - expected.clamp(0, 1)).abs().max().item() < 1e-5


def test_weights_of_no_known_architecture_are_named_with_what_was_recognised(tmp_path, parity_dir):
    torch.save({"params": {"conv.weight": torch.zeros(4, 3, 3, 3)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth matches no known architecture .* 1 tensors, e.g. conv.weight"):
        load_network(tmp_path / "other.pth")
    state = torch.load(parity_dir / "restormer" / "net_g.pth", weights_only=True)["params"]
    del state["latent.0.attn.temperature"]
    torch.save({"params": state}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"looks like a Restormer .* has no 'latent.0.attn.temperature'"):
        load_network(tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"\['window'\] are not arguments of the Swintormer"):
        load_network(parity_dir / "swintormer" / "net_g.pth", {"window": 4})


def tiny_official_file(tmp_path):
    torch.manual_seed(0)
    net = Restormer(**TINY_RESTORMER_KWARGS)
    torch.save({"params": net.state_dict()}, tmp_path / "tiny.pth")
    return net.eval(), tmp_path / "tiny.pth"


def test_export_round_trip_and_the_python_api(tmp_path):
    net, path = tiny_official_file(tmp_path)
    folder = export(path, tmp_path / "export", {"_target_": "deblur_diffusion.models.Restormer", **TINY_RESTORMER_KWARGS})
    assert (folder / "model.safetensors").is_file()
    restorer = load_pretrained(folder)
    image = torch.rand(3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(restorer.restore(image), net(image[None])[0].clamp(0, 1))
    sixteen = (np.random.default_rng(0).random((20, 28, 3)) * 65535).astype(np.uint16)
    assert restorer.restore_image(sixteen).dtype == np.uint16
    picture = restorer.restore_image(Image.fromarray((np.random.default_rng(1).random((20, 28, 3)) * 255).astype(np.uint8)))
    assert isinstance(picture, Image.Image) and picture.size == (28, 20)
    with pytest.raises(DeblurError, match="got a int32 array"):
        restorer.restore_image(np.zeros((20, 28, 3), dtype=np.int32))


def write_dpdd(root, scenes=76, size=24):
    rng = np.random.default_rng(0)
    for index in range(scenes):
        sharp = rng.random((size, size, 3)).astype(np.float32)
        blurry = cv2.GaussianBlur(sharp, (5, 5), 1.0)
        write_image(root / "test_c" / "target" / f"{index:03d}.png", sharp, 16)
        for view in ("c", "l", "r"):
            write_image(root / f"test_{view}" / "source" / f"{index:03d}.png", blurry, 16)


@pytest.mark.slow
def test_evaluate_reports_dpdd_indoor_outdoor_and_combined(tmp_path):
    _, path = tiny_official_file(tmp_path)
    write_dpdd(tmp_path / "DPDD")
    result = run_cli(
        "evaluate",
        f"ckpt={path}",
        *TINY_RESTORMER_OVERRIDES,
        "data=dpdd",
        f"paths.data_dir={tmp_path}",
        "lpips=false",
        f"hydra.run.dir={tmp_path}/eval",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["protocol"] == "dpdd_single"
    assert {g: v["images"] for g, v in summary["summary"].items()} == {"indoor": 37, "outdoor": 39, "combined": 76}
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    # The indoor scenes of DPDD's test set, 0-based in sorted file order, as the official
    # evaluation labels them (Restormer's Defocus_Deblurring indoor/outdoor split).
    official_indoor = [8, 9, 10, 11, 12, 13, 16, 32, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    official_indoor += [50, 51, 52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64, 65, 66, 67, 74, 75]
    assert [i for i, row in enumerate(rows) if row["group"] == "indoor"] == official_indoor
    indoor = np.mean([float(r["psnr"]) for r in rows if r["group"] == "indoor"])
    assert summary["summary"]["indoor"]["psnr"] == pytest.approx(indoor)
    assert "indoor" in result.stdout and "combined" in result.stdout
    run_log = (tmp_path / "eval" / "evaluate.log").read_text()
    assert "│ combined │     76 │" in run_log and f"Results: {tmp_path}/eval/summary.md" in run_log


@pytest.mark.slow
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_evaluate_on_a_synthesized_folder_scores_like_scikit_image(tmp_path, bit_depth):
    _, path = tiny_official_file(tmp_path)
    assert (
        run_cli(
            "data.synthesize",
            f"out={tmp_path}/GoPro",
            "train_pairs=1",
            "test_pairs=3",
            "image_size=32",
            f"bit_depth={bit_depth}",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    result = run_cli(
        "evaluate",
        f"ckpt={path}",
        *TINY_RESTORMER_OVERRIDES,
        "data=gopro",
        "protocol=standard",
        f"paths.data_dir={tmp_path}",
        "save_images=true",
        "inference=tiles",
        "inference.tile_size=16",
        "inference.stride=12",
        f"hydra.run.dir={tmp_path}/eval",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LPIPS not reported" in result.stdout or "lpips" in (tmp_path / "eval" / "per_image.csv").read_text()
    if "LPIPS not reported" in result.stdout:  # offline: the written summaries say so, and why
        assert "LPIPS was not computed: torchvision's AlexNet weights" in (tmp_path / "eval" / "summary.md").read_text()
        assert "could not be downloaded" in json.loads((tmp_path / "eval" / "summary.json").read_text())["lpips_missing"]
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    for row in rows:
        saved = read_image_raw(tmp_path / "eval" / "images" / f"{row['name']}.png")
        assert saved.dtype == (np.uint16 if bit_depth == 16 else np.uint8)
        scale = 65535.0 if bit_depth == 16 else 255.0
        target = read_image_raw(tmp_path / "GoPro" / "test" / "target" / f"{row['name']}.png") / scale
        assert float(row["psnr"]) == pytest.approx(peak_signal_noise_ratio(target, saved / scale, data_range=1.0), abs=1e-4)
        expected_ssim = structural_similarity(
            target, saved / scale, channel_axis=2, gaussian_weights=True, sigma=1.5, data_range=1.0, use_sample_covariance=False
        )
        assert float(row["ssim"]) == pytest.approx(expected_ssim, abs=1e-4)


@pytest.mark.slow
def test_evaluate_without_a_test_split_says_so(tmp_path):
    _, path = tiny_official_file(tmp_path)
    result = run_cli("evaluate", f"ckpt={path}", *TINY_RESTORMER_OVERRIDES, f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert result.returncode == 1 and "split=val" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_logs_its_per_image_table_with_pictures_to_wandb(tmp_path):
    _, path = tiny_official_file(tmp_path)
    offline = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_MODE": "offline", "NETRC": str(tmp_path / "none")}
    result = run_cli(
        "evaluate",
        f"ckpt={path}",
        *TINY_RESTORMER_OVERRIDES,
        "split=val",
        "data.val.length=3",
        "data.val.image_size=32",
        "lpips=false",
        "wandb.enabled=true",
        "wandb.images=2",
        f"hydra.run.dir={tmp_path}/eval",
        cwd=tmp_path,
        env=offline,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "eval" / "wandb").glob("offline-run-*")
    (table_file,) = (run / "files" / "media" / "table").glob("per_image_*.table.json")
    table = json.loads(table_file.read_text())
    names = [row["name"] for row in csv.DictReader((tmp_path / "eval" / "per_image.csv").read_text().splitlines())]
    assert [row[0] for row in table["data"]] == names and len(names) == 3
    assert table["columns"][-1] == "blurry | restored | sharp"
    assert [row[-1] is not None for row in table["data"]] == [True, True, False]  # pictures of the first two


@pytest.mark.slow
def test_predict_keeps_names_and_bit_depth_and_reports_a_corrupt_file(tmp_path):
    _, path = tiny_official_file(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for bit_depth, size in ((8, 24), (16, 72)):
        written = run_cli(
            "data.synthesize",
            f"out={tmp_path}/syn{bit_depth}",
            "train_pairs=0",
            "test_pairs=1",
            f"image_size={size}",
            f"bit_depth={bit_depth}",
            cwd=tmp_path,
        )
        assert written.returncode == 0, written.stderr[-2000:]
        (inputs / f"bits{bit_depth}.png").write_bytes((tmp_path / f"syn{bit_depth}" / "test" / "input" / "000000.png").read_bytes())
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_cli(
        "predict",
        f"ckpt={path}",
        *TINY_RESTORMER_OVERRIDES,
        f"input={inputs}",
        f"output={tmp_path}/out",
        "max_pixels=2000",
        "inference.tile_size=32",
        "inference.stride=24",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "broken.png" in result.stdout and "Restored 2 of 3" in result.stdout
    assert read_image_raw(tmp_path / "out" / "bits8.png").dtype == np.uint8
    sixteen = read_image_raw(tmp_path / "out" / "bits16.png")
    assert sixteen.dtype == np.uint16 and sixteen.shape == (72, 72, 3)
    assert sorted(p.name for p in inputs.iterdir()) == ["bits16.png", "bits8.png", "broken.png"]


@pytest.mark.slow
def test_predict_refuses_to_write_into_the_input_folder(tmp_path):
    _, path = tiny_official_file(tmp_path)
    write_image(tmp_path / "in" / "a.png", np.zeros((16, 16, 3)), 8)
    result = run_cli(
        "predict", f"ckpt={path}", *TINY_RESTORMER_OVERRIDES, f"input={tmp_path}/in", f"output={tmp_path}/in/restored", cwd=tmp_path
    )
    assert result.returncode == 1 and "inside the input folder" in result.stderr
    assert not (tmp_path / "in" / "restored").exists()


@pytest.mark.slow
def test_training_checkpoint_exports_and_predicts(tmp_path):
    trained = run_cli(
        "train",
        "debug=tiny",
        "model.ema_decay=0.9",
        "test=false",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    exported = run_cli("export", f"ckpt={ckpt}", f"out={tmp_path}/export", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    from_ckpt, from_export = load_network(ckpt).net, load_network(tmp_path / "export").net
    for key, value in from_export.state_dict().items():
        assert torch.equal(value, state[f"ema.module.{key}"]) and torch.equal(value, from_ckpt.state_dict()[key])


def evaluate_in_process(tmp_path, *overrides):
    from conftest import compose_config

    from deblur_diffusion.evaluate import evaluate

    cfg = compose_config("evaluate", tmp_path, *overrides, f"output_dir={tmp_path}/eval", "lpips=false", "data.num_workers=0")
    return evaluate(cfg)


def stage_one_checkpoint(tmp_path):
    from networks import TINY_CONFIGS, tiny_network

    from deblur_diffusion.stages import HIDiffStageOne

    stage = HIDiffStageOne(tiny_network("hidiff_stage_one"), torch.nn.L1Loss(), torch.optim.AdamW)
    checkpoint = {"state_dict": stage.state_dict()}
    stage.run_config = {"model": {"net": TINY_CONFIGS["hidiff_stage_one"]}}
    stage.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "stage_one.ckpt")
    return tmp_path / "stage_one.ckpt"


def test_a_stage_one_network_is_not_scored_as_a_restoration_unless_asked_and_then_marked(tmp_path):
    from deblur_diffusion.errors import ConfigError

    path = stage_one_checkpoint(tmp_path)
    data = ["split=val", "data.val.length=2", "data.val.image_size=32"]
    with pytest.raises(ConfigError, match="prior is computed from the sharp image"):
        evaluate_in_process(tmp_path, f"ckpt={path}", *data)
    assert not (tmp_path / "eval").exists()
    evaluate_in_process(tmp_path, f"ckpt={path}", *data, "score_with_ground_truth_prior=true")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["prior_from_ground_truth"] is True and "NOT A RESTORATION" in summary["note"]
    assert "NOT A RESTORATION" in (tmp_path / "eval" / "summary.md").read_text()
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row["prior_from_ground_truth"] == "True" for row in rows)
    assert summary["weights"] == "raw"


def test_the_blurry_input_row_of_dual_pixel_data_scores_the_combined_view(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"{index:03d}" for index in range(2)]
    combined = {}
    for name in names:
        sharp = rng.random((24, 24, 3)).astype(np.float32)
        views = {"c": cv2.GaussianBlur(sharp, (5, 5), 1.0), "l": np.roll(sharp, 2, axis=1), "r": np.roll(sharp, -3, axis=0)}
        write_image(tmp_path / "DPDD" / "test_c" / "target" / f"{name}.png", sharp, 16)
        for view, image in views.items():
            write_image(tmp_path / "DPDD" / f"test_{view}" / "source" / f"{name}.png", image, 16)
        combined[name] = read_image_raw(tmp_path / "DPDD" / "test_c" / "source" / f"{name}.png") / 65535.0
    net = Restormer(**TINY_RESTORMER_KWARGS, inp_channels=6, dual_pixel_task=True)
    torch.save({"params": net.state_dict()}, tmp_path / "dual.pth")
    overrides = [f"ckpt={tmp_path / 'dual.pth'}", "model=restormer", *TINY_RESTORMER_OVERRIDES[1:]]
    evaluate_in_process(tmp_path, *overrides, "data=dpdd_dual", f"paths.data_dir={tmp_path}")
    with open(tmp_path / "eval" / "per_image.csv") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    for name, blurry in combined.items():
        target = read_image_raw(tmp_path / "DPDD" / "test_c" / "target" / f"{name}.png") / 65535.0
        expected = peak_signal_noise_ratio(target, blurry, data_range=1.0)
        assert float(rows[name]["input_psnr"]) == pytest.approx(expected, abs=1e-3)
