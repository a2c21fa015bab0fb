"""The prepared crop store: the official crop rule, the sharpness filter, resuming, the settings
check, and training patches identical to the folder path's."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import FAST_TRAINER, TINY_RESTORMER, run_cli

from deblur_diffusion.data import DPDD, DeblurDataModule, FolderPairs
from deblur_diffusion.data.crops import CropRule
from deblur_diffusion.data.patches import PatchKey, TrainPatches
from deblur_diffusion.data.prepared import PreparedCrops
from deblur_diffusion.data.priors import WithPrior
from deblur_diffusion.data.store_writer import prepare_store
from deblur_diffusion.errors import ConfigError, DatasetLayoutError


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels[:, :, ::-1])
    return path


def write_dual_pixel(root: Path, rng, names, size) -> WithPrior:
    """A 16-bit DPDD in the re-laid layout with 16-bit priors: three input planes and a target."""
    for name in names:
        for folder in ("inputC", "inputL", "inputR", "target"):
            write_png(root / "train" / folder / f"{name}.png", rng.integers(0, 65536, (*size, 3), dtype=np.uint16))
        write_png(root / "priors" / "train" / f"{name}.png", rng.integers(0, 65536, (*size, 3), dtype=np.uint16))
    return WithPrior(DPDD(root, "train", views=["l", "r"]), root / "priors" / "train")


# Crop origins read off generate_patches_gopro.py (np.arange(0, L - 512, 256) + [L - 512]) and
# generate_patches_dpdd.py (every 204 px while the crop fits, plus the crop flush with the border).
OFFICIAL_ORIGINS = [
    ((720, 1280), CropRule(512, 256), [0, 208], [0, 256, 512, 768]),
    ((1120, 1680), CropRule(512, 204, 0.7), [0, 204, 408, 608], [0, 204, 408, 612, 816, 1020, 1168]),
]


@pytest.mark.parametrize(("size", "rule", "rows", "cols"), OFFICIAL_ORIGINS)
def test_crop_windows_are_the_official_scripts(size, rule, rows, cols):
    assert rule.windows(*size) == [(top, left) for top in rows for left in cols]


def test_an_image_smaller_than_a_crop_is_one_crop():
    assert CropRule(512, 256).windows(300, 700) == [(0, 0), (0, 188)]


def test_the_sharpness_filter_drops_the_30_percent_least_sharp_target_crops(rng):
    crops = [rng.integers(0, 65536, (64, 64, 3), dtype=np.uint16) for _ in range(10)]
    blurred = [1, 4, 8]
    for index in blurred:
        crops[index] = cv2.GaussianBlur(crops[index], (0, 0), 4.0)
    kept = CropRule(64, 64, keep_sharpest=0.7).kept(crops)
    assert [index for index, keep in enumerate(kept) if not keep] == blurred
    assert all(CropRule(64, 64).kept(crops))


def test_stored_crops_hold_the_source_pixels_at_their_windows(tmp_path, rng):
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (48, 80))
    manifest = prepare_store(source, tmp_path / "store", CropRule(32, 24))
    store = PreparedCrops(tmp_path / "store")
    assert len(store) == 2 * 2 * 3 and store.in_channels == 9
    for index in (0, 5, 11):
        name, pair, top, left, height, width = manifest["crops"][index]
        planes = source.load_planes(pair)
        stored = store.load_planes(index)
        for original, crop in zip((*planes.inputs, planes.target), (*stored.inputs, stored.target), strict=True):
            np.testing.assert_array_equal(crop, original[top : top + height, left : left + width])
        assert name == f"{source.name(pair)}-{index % 6 + 1}" and stored.target.dtype == np.uint16


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_the_same_keys_give_the_same_training_patches_from_the_store_and_the_folder(tmp_path, rng, encoding):
    # Images exactly one crop large: crop i of the store is pair i of the folder.
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b", "c"], (40, 40))
    prepare_store(source, tmp_path / "store", CropRule(40, 20), encoding)
    from_folder, from_store = TrainPatches(source), TrainPatches(PreparedCrops(tmp_path / "store"))
    for key in [PatchKey(0, 32, 7), PatchKey(2, 16, 123), PatchKey(1, 40, 5), PatchKey(1, 48, 9)]:
        a, b = from_folder[key], from_store[key]
        torch.testing.assert_close(a["lq"], b["lq"], rtol=0, atol=0)
        torch.testing.assert_close(a["gt"], b["gt"], rtol=0, atol=0)


class InterruptedAfter(FolderPairs):
    """A folder whose reading fails at one pair, as if the preparation were killed there."""

    fail_at: int | None = None
    loaded: list[int]

    def load_planes(self, index, rng=None):
        if index == self.fail_at:
            raise KeyboardInterrupt
        self.loaded.append(index)
        return super().load_planes(index, rng)


def test_an_interrupted_preparation_resumes_after_the_last_complete_pair(tmp_path, rng):
    for name in "abcde":
        write_png(tmp_path / "input" / f"{name}.png", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
        write_png(tmp_path / "target" / f"{name}.png", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    source = InterruptedAfter(tmp_path / "input", tmp_path / "target")
    source.loaded, source.fail_at = [], 3
    with pytest.raises(KeyboardInterrupt):
        prepare_store(source, tmp_path / "store", CropRule(32, 16))
    with pytest.raises(DatasetLayoutError, match="incomplete"):
        PreparedCrops(tmp_path / "store")
    source.loaded, source.fail_at = [], None
    resumed = prepare_store(source, tmp_path / "store", CropRule(32, 16))
    assert source.loaded == [3, 4]
    uninterrupted = prepare_store(source, tmp_path / "fresh", CropRule(32, 16))
    assert resumed["crops"] == uninterrupted["crops"]
    stores = PreparedCrops(tmp_path / "store"), PreparedCrops(tmp_path / "fresh")
    for index in range(len(resumed["crops"])):
        a, b = (store.load_planes(index) for store in stores)
        np.testing.assert_array_equal(a.inputs[0], b.inputs[0])
        np.testing.assert_array_equal(a.target, b.target)


def test_a_store_made_with_other_settings_is_refused(tmp_path, rng):
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (40, 40))
    prepare_store(source, tmp_path / "store", CropRule(32, 16))
    with pytest.raises(ConfigError, match=r"crops: store \{'size': 32, 'stride': 16, .*\}, requested \{'size': 32, 'stride': 8"):
        prepare_store(source, tmp_path / "store", CropRule(32, 8))
    prepare_store(source, tmp_path / "store", CropRule(32, 8), overwrite=True)
    with pytest.raises(ConfigError, match=r"crops: store \{'size': 32, 'stride': 8, .*\}, requested \{'size': 32, 'stride': 16"):
        DeblurDataModule(train=source, in_channels=9, crops={"size": 32, "stride": 16}, prepared_dir=str(tmp_path / "store"))
    single_view = DPDD(tmp_path / "DPDD", "train", views=["c"])
    with pytest.raises(ConfigError, match="in_channels"):
        DeblurDataModule(train=single_view, in_channels=3, crops={"size": 32, "stride": 8}, prepared_dir=str(tmp_path / "store"))
    with pytest.raises(DatasetLayoutError, match="no prepared store"):
        PreparedCrops(tmp_path / "nowhere")


def batches(datamodule, count):
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_data_workers_read_the_store_as_the_main_process_does(tmp_path, rng):
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b", "c"], (48, 48))
    prepare_store(source, tmp_path / "store", CropRule(32, 16))
    options = dict(
        train=source, in_channels=9, crops={"size": 32, "stride": 16}, prepared_dir=str(tmp_path / "store"), patch_schedule=[[0, 24, 4]]
    )
    in_process = batches(DeblurDataModule(num_workers=0, **options), 3)
    in_workers = batches(DeblurDataModule(num_workers=2, **options), 3)
    for a, b in zip(in_process, in_workers, strict=True):
        assert a["name"] == b["name"]
        torch.testing.assert_close(a["lq"], b["lq"], rtol=0, atol=0)


@pytest.mark.slow
def test_prepare_cli_then_training_from_the_store(tmp_path):
    run_cli("data.synthesize", f"out={tmp_path / 'GoPro'}", "train_pairs=4", "test_pairs=2", "image_size=48", cwd=tmp_path)
    data = [f"paths.data_dir={tmp_path}", "data=gopro", "data.crops.size=32", "data.crops.stride=16"]
    prepared = run_cli("data.prepare", *data, f"out={tmp_path / 'store'}", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "16 crops of 4 pairs" in prepared.stdout
    from_store = [*data, f"data.prepared_dir={tmp_path / 'store'}", "model=restormer", *TINY_RESTORMER, *FAST_TRAINER]
    trained = run_cli(
        "train",
        *from_store,
        "data.num_workers=2",
        "data.patch_schedule=[[0,32,2]]",
        "trainer.accumulate_grad_batches=1",
        "test=false",
        f"paths.output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "16 prepared crops" in trained.stdout
    refused = run_cli("train", *from_store, "data.crops.stride=8", f"paths.output_dir={tmp_path / 'refused'}", cwd=tmp_path)
    assert (
        refused.returncode == 1
        and "crops: store {'size': 32, 'stride': 16" in refused.stderr
        and "requested {'size': 32, 'stride': 8" in refused.stderr
    )


def test_the_training_plan_points_folder_training_to_the_store(tmp_path, rng):
    from rich.console import Console

    from deblur_diffusion.data.schedule import ProgressiveSchedule, plan_training
    from deblur_diffusion.planning import plan_table
    from deblur_diffusion.train import plan_caption

    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (40, 40))
    prepare_store(source, tmp_path / "store", CropRule(32, 16))
    options = dict(train=source, in_channels=9, crops={"size": 32, "stride": 16}, patch_schedule=[[0, 24, 2]])

    def shown(datamodule):
        console = Console(width=400, record=True)
        plan = plan_training(ProgressiveSchedule([[0, 24, 2]]), world_size=1)
        console.print(plan_table(plan, datamodule.training_pairs(), plan_caption(datamodule)))
        return console.export_text()

    assert "deblur_diffusion.data.prepare" in shown(DeblurDataModule(**options))
    assert "deblur_diffusion.data.prepare" not in shown(DeblurDataModule(prepared_dir=str(tmp_path / "store"), **options))
    assert "deblur_diffusion.data.prepare" not in shown(DeblurDataModule(patch_schedule=[[0, 24, 2]]))


def test_a_store_follows_its_priors_when_they_move_but_not_when_they_change(tmp_path, rng):
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (40, 40))
    # What generate_prior records in a prior folder (its README section and manifest.json).
    manifest = {
        "ckpt_sha256": "0f3a",
        "ldm_config_sha256": "77c1",
        "prior": "official",
        "steps": 50,
        "seed": 0,
        "eta": 1.0,
        "inference": {"split_input": {"ks": [128, 128], "stride": [64, 64]}, "condition_multiple": 128, "self_ensemble": False},
        "priors": {},
    }
    (source.prior_dir / "manifest.json").write_text(json.dumps(manifest))
    prepare_store(source, tmp_path / "store", CropRule(32, 16))
    options = dict(in_channels=9, crops={"size": 32, "stride": 16}, prepared_dir=str(tmp_path / "store"))
    moved = tmp_path / "elsewhere" / "priors_T50"
    moved.parent.mkdir()
    source.prior_dir.rename(moved)
    DeblurDataModule(train=WithPrior(source.source, moved), **options)
    (moved / "manifest.json").write_text(json.dumps(manifest | {"steps": 20}))
    with pytest.raises(ConfigError, match=r"priors: store \{.*'steps': 50.*\}, requested \{.*'steps': 20"):
        DeblurDataModule(train=WithPrior(source.source, moved), **options)


def test_a_store_refuses_another_view_order_and_priors_without_a_manifest_that_moved(tmp_path, rng):
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (40, 40))
    prepare_store(source, tmp_path / "store", CropRule(32, 16))
    options = dict(in_channels=9, crops={"size": 32, "stride": 16}, prepared_dir=str(tmp_path / "store"))
    swapped = WithPrior(DPDD(tmp_path / "DPDD", "train", views=["r", "l"]), source.prior_dir)
    with pytest.raises(ConfigError, match="files_sha1"):
        DeblurDataModule(train=swapped, **options)
    moved = tmp_path / "priors_elsewhere"
    source.prior_dir.rename(moved)  # no generate_prior manifest: identified by its folder
    with pytest.raises(
        ConfigError, match=r"priors: store \{'folder': '[^']*/priors/train'\}, requested \{'folder': '[^']*/priors_elsewhere'"
    ):
        DeblurDataModule(train=WithPrior(source.source, moved), **options)
    with pytest.raises(DatasetLayoutError, match="prior folder .* does not exist"):
        DeblurDataModule(train=source, **options)


def test_a_store_used_without_its_training_set_needs_evaluation_read_alike(tmp_path, rng):
    write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (40, 40))
    sixteen_bit = DPDD(tmp_path / "DPDD", "train", views=["c"])
    prepare_store(sixteen_bit, tmp_path / "store", CropRule(32, 16))
    options = dict(train=None, in_channels=3, prepared_dir=str(tmp_path / "store"))
    DeblurDataModule(val=DPDD(tmp_path / "DPDD", "train", views=["c"]), **options)
    with pytest.raises(ConfigError, match="read_8bit"):
        DeblurDataModule(val=DPDD(tmp_path / "DPDD", "train", views=["c"], read_8bit=True), **options)


def test_single_image_dpdd_crops_are_ranked_on_the_16_bit_targets_as_the_official_script(tmp_path, rng):
    # generate_patches_dpdd.py reads the target with cv2.imread(path, -1) (16 bits) and drops the
    # 30 % least sharp crops, even where training reads the images as 8 bits. Here every target
    # value has the same high byte, so the 8-bit reading is flat everywhere; at 16 bits three crops
    # are flat (the least sharp) and the others textured.
    crop, flat = 32, [(0, 64), (32, 0), (32, 96)]
    target = rng.integers(29952, 30208, (64, 160, 3), dtype=np.uint16)
    for top, left in flat:
        target[top : top + crop, left : left + crop] = 30000
    write_png(tmp_path / "DPDD" / "train" / "target" / "a.png", target)
    write_png(tmp_path / "DPDD" / "train" / "inputC" / "a.png", target)
    eight_bit = DPDD(tmp_path / "DPDD", "train", views=["c"], read_8bit=True)
    manifest = prepare_store(eight_bit, tmp_path / "store", CropRule(crop, crop, keep_sharpest=0.7))
    windows = CropRule(crop, crop).windows(64, 160)
    assert len(windows) == 10
    assert [(top, left) for _, _, top, left, _, _ in manifest["crops"]] == [w for w in windows if w not in flat]
    assert PreparedCrops(tmp_path / "store").load_planes(0).target.dtype == np.uint8


def test_the_store_grows_its_map_instead_of_reserving_terabytes(tmp_path, rng, monkeypatch):
    from deblur_diffusion.data import store_writer

    monkeypatch.setattr(store_writer, "INITIAL_MAP_SIZE", 64 * 1024)  # smaller than one pair's crops
    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b", "c"], (48, 80))
    manifest = prepare_store(source, tmp_path / "store", CropRule(32, 24))
    store = PreparedCrops(tmp_path / "store")
    _, pair, top, left, height, width = manifest["crops"][-1]
    np.testing.assert_array_equal(
        store.load_planes(len(store) - 1).target, source.load_planes(pair).target[top : top + height, left : left + width]
    )


def test_evaluation_never_opens_the_training_store(tmp_path):
    from conftest import compose_config
    from hydra.errors import InstantiationException

    from deblur_diffusion.cli import split_datamodule

    cfg = compose_config("evaluate", tmp_path, "ckpt=unused", f"data.prepared_dir={tmp_path}/store_on_another_machine")
    assert len(split_datamodule(cfg, "val").pairs("val")) > 0
    with pytest.raises(InstantiationException, match="no prepared store in .*store_on_another_machine"):
        split_datamodule(cfg, "train")


class _ReadInWorker(torch.utils.data.Dataset):
    """Crop ``index`` of a store, with the process that read it and the process its LMDB
    transaction was opened in."""

    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, index):
        import os

        target = self.store.load_planes(index).target
        return os.getpid(), self.store._pid, torch.from_numpy(target.astype(np.int64))


def test_data_workers_forked_after_a_read_open_their_own_store_transaction(tmp_path, rng):
    import os

    source = write_dual_pixel(tmp_path / "DPDD", rng, ["a", "b"], (48, 80))
    prepare_store(source, tmp_path / "store", CropRule(32, 24))
    store = PreparedCrops(tmp_path / "store")
    in_parent = [store.load_planes(index).target for index in range(len(store))]  # opens the parent's transaction
    assert store._pid == os.getpid()
    loader = torch.utils.data.DataLoader(_ReadInWorker(store), batch_size=None, num_workers=2, multiprocessing_context="fork")
    for index, (worker, opened_in, target) in enumerate(loader):
        assert worker != os.getpid() and opened_in == worker
        np.testing.assert_array_equal(target.numpy(), in_parent[index])
