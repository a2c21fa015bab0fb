import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deblur_diffusion.data import DPDD, HIDE, DeblurDataModule, FolderPairs, GoPro, PairListFile, RealBlur, SyntheticPairs
from deblur_diffusion.data.patches import PatchKey, TrainPatches, WholeImages
from deblur_diffusion.data.synthesize import synthesize
from deblur_diffusion.data.synthetic import TRAIN_PHOTOS, VALIDATION_PHOTOS
from deblur_diffusion.errors import ConfigError, DatasetLayoutError, ImageReadError, PairMismatchError


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Writes an RGB uint8/uint16 array with OpenCV (independent of the package's writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels[:, :, ::-1] if pixels.ndim == 3 else pixels)
    return path


def random_pixels(rng, height, width, bits=8):
    return rng.integers(0, 2**bits, size=(height, width, 3), dtype=np.uint8 if bits == 8 else np.uint16)


def make_folder(root: Path, rng, names=("a", "b", "c"), size=(20, 24), bits=8):
    for name in names:
        write_png(root / "input" / f"{name}.png", random_pixels(rng, *size, bits))
        write_png(root / "target" / f"{name}.png", random_pixels(rng, *size, bits))
    return root


@pytest.mark.parametrize("bits", [8, 16])
def test_folder_pairs_read_8_and_16_bit(tmp_path, rng, bits):
    make_folder(tmp_path, rng, bits=bits)
    source = FolderPairs(tmp_path / "input", tmp_path / "target")
    assert len(source) == 3 and [source.name(i) for i in range(3)] == ["a", "b", "c"]
    lq, gt = source.load(1)
    expected = cv2.imread(str(tmp_path / "input" / "b.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    np.testing.assert_allclose(lq, expected / (2**bits - 1), atol=1e-6)
    assert gt.shape == (20, 24, 3)


def test_unpaired_file_names_are_reported(tmp_path, rng):
    make_folder(tmp_path, rng)
    (tmp_path / "target" / "c.png").rename(tmp_path / "target" / "z.png")
    with pytest.raises(PairMismatchError, match=r"(?s)1 inputs without target .*\['c'\].*1 targets without input .*\['z'\]"):
        FolderPairs(tmp_path / "input", tmp_path / "target")


def test_mismatched_pair_sizes_name_both_files(tmp_path, rng):
    make_folder(tmp_path, rng)
    write_png(tmp_path / "target" / "b.png", random_pixels(rng, 20, 25))
    with pytest.raises(PairMismatchError, match=r"input/b.png.*target/b.png"):
        FolderPairs(tmp_path / "input", tmp_path / "target")


def test_corrupt_file_is_named_when_read(tmp_path, rng):
    make_folder(tmp_path, rng)
    (tmp_path / "input" / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageReadError, match="input/c.png"):
        FolderPairs(tmp_path / "input", tmp_path / "target")
    source = FolderPairs(tmp_path / "input", tmp_path / "target", verify_sizes=False)
    source.load(0)
    with pytest.raises(ImageReadError, match="input/c.png"):
        source.load(2)


def test_missing_dataset_names_the_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)GoPro.*train/input/\*\.png.*sharp") as error:
        GoPro(tmp_path / "GoPro", "train")
    assert "DEBLUR_DATA" in str(error.value)
    with pytest.raises(DatasetLayoutError, match="RealBlur_J_test_list.txt"):
        RealBlur(tmp_path, "J", "test")
    with pytest.raises(DatasetLayoutError, match=r"test_c/target"):
        DPDD(tmp_path, "test")


@pytest.mark.parametrize("layout", ["flat", "scenes"])
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_gopro_reads_what_synthesize_writes(tmp_path, layout, bit_depth):
    synthesize(tmp_path, train_pairs=5, test_pairs=2, image_size=32, kernel_size=5, bit_depth=bit_depth, layout=layout, pairs_per_scene=2)
    train = GoPro(tmp_path, "train")
    test = GoPro(tmp_path, "test")
    assert len(train) == 5 and len(test) == 2
    lq, gt = test.load(0)
    assert lq.shape == gt.shape == (32, 32, 3)
    expected_lq, expected_gt = SyntheticPairs("val", length=2, image_size=32, kernel_size=5).load(0, None)
    np.testing.assert_allclose(gt, expected_gt, atol=0.5 / (2**bit_depth - 1) + 1e-6)
    np.testing.assert_allclose(lq, expected_lq, atol=0.5 / (2**bit_depth - 1) + 1e-6)
    if layout == "scenes":
        assert train.name(0) == "scene000_000000"


def test_hide_original_layout(tmp_path, rng):
    for sub, name in [("test-close-ups", "1"), ("test-long-shot", "2")]:
        write_png(tmp_path / "test" / sub / f"{name}.png", random_pixels(rng, 8, 8))
    for name in ["1", "2", "3"]:
        write_png(tmp_path / "GT" / f"{name}.png", random_pixels(rng, 8, 8))
    assert [HIDE(tmp_path).name(i) for i in range(2)] == ["1", "2"]


def test_realblur_pair_list(tmp_path, rng):
    lines = []
    for scene in ["scene001", "scene002"]:
        for frame in [1, 2]:
            gt = write_png(tmp_path / "RealBlur-J_ref" / scene / "gt" / f"gt_{frame}.png", random_pixels(rng, 10, 12))
            blur = write_png(tmp_path / "RealBlur-J_ref" / scene / "blur" / f"blur_{frame}.png", random_pixels(rng, 10, 12))
            lines.append(f"{gt.relative_to(tmp_path)} {blur.relative_to(tmp_path)}")
    (tmp_path / "RealBlur_J_test_list.txt").write_text("\n".join(lines) + "\n")
    source = RealBlur(tmp_path, "J", "test")
    assert len(source) == 4
    assert source.name(0) == "scene001_gt_gt_1"
    lq, _ = source.load(0)
    np.testing.assert_allclose(lq * 255, cv2.imread(str(tmp_path / "RealBlur-J_ref/scene001/blur/blur_1.png"))[:, :, ::-1], atol=1e-3)


def test_pair_list_with_a_bad_line_names_the_line(tmp_path):
    (tmp_path / "pairs.txt").write_text("a.png b.png\nonly_one.png\n")
    with pytest.raises(DatasetLayoutError, match="pairs.txt:2"):
        PairListFile(tmp_path / "pairs.txt")


def make_dpdd(root: Path, rng, split="test", names=("0001", "0002")):
    for name in names:
        write_png(root / f"{split}_c" / "target" / f"{name}.png", random_pixels(rng, 12, 16, 16))
        for view in "clr":
            write_png(root / f"{split}_{view}" / "source" / f"{name}.png", random_pixels(rng, 12, 16, 16))


def test_dpdd_dual_pixel_concatenates_views_in_the_configured_order(tmp_path, rng):
    make_dpdd(tmp_path, rng)
    single = DPDD(tmp_path, "test")
    left_right = DPDD(tmp_path, "test", views=["l", "r"])
    right_left = DPDD(tmp_path, "test", views=["r", "l"])
    assert single.in_channels == 3 and left_right.in_channels == 6
    lr, gt = left_right.load(1)
    rl, _ = right_left.load(1)
    assert lr.shape == (12, 16, 6)
    left = cv2.imread(str(tmp_path / "test_l/source/0002.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1] / 65535
    np.testing.assert_allclose(lr[:, :, :3], left, atol=1e-6)
    np.testing.assert_array_equal(lr[:, :, :3], rl[:, :, 3:])
    np.testing.assert_array_equal(single.load(1)[1], gt)


def test_dpdd_missing_view_is_reported(tmp_path, rng):
    make_dpdd(tmp_path, rng)
    (tmp_path / "test_r" / "source" / "0002.png").unlink()
    with pytest.raises(PairMismatchError, match="0002"):
        DPDD(tmp_path, "test", views=["l", "r"])


class IdentityPairs(SyntheticPairs):
    """Pairs whose input equals the target, to check that crops and augmentations match."""

    def load(self, index, rng):
        _, gt = super().load(index, rng)
        return gt.copy(), gt


def test_training_patches_crop_and_augment_both_images_identically():
    patches = TrainPatches(IdentityPairs("train", length=4, image_size=40, kernel_size=3))
    for seed in range(10):
        item = patches[PatchKey(seed % 4, 24, seed)]
        assert item["lq"].shape == item["gt"].shape == (3, 24, 24)
        assert torch.equal(item["lq"], item["gt"])
    assert torch.equal(patches[PatchKey(1, 24, 5)]["gt"], patches[PatchKey(1, 24, 5)]["gt"])


def test_images_smaller_than_the_patch_are_padded(tmp_path, rng):
    make_folder(tmp_path, rng, size=(10, 14))
    item = TrainPatches(FolderPairs(tmp_path / "input", tmp_path / "target"))[PatchKey(0, 32, 0)]
    assert item["lq"].shape == (3, 32, 32)


def test_synthetic_split_is_by_source_and_validation_is_reproducible():
    assert not set(TRAIN_PHOTOS) & set(VALIDATION_PHOTOS)
    val = SyntheticPairs("val", length=6, image_size=32, seed=3)
    names = [val.name(i) for i in range(6)]
    assert all(any(source in n for source in (*VALIDATION_PHOTOS, "dead_leaves")) for n in names)
    first = [val.load(i, np.random.default_rng(i + 100)) for i in range(6)]
    again = [SyntheticPairs("val", length=6, image_size=32, seed=3).load(i, None) for i in range(6)]
    for (lq_a, gt_a), (lq_b, gt_b) in zip(first, again, strict=False):
        np.testing.assert_array_equal(lq_a, lq_b)
        np.testing.assert_array_equal(gt_a, gt_b)
    # Every pair is visibly blurred.
    for lq, gt in first:
        assert np.mean((lq - gt) ** 2) > 1e-5


def test_datamodule_rejects_a_channel_mismatch(tmp_path, rng):
    make_dpdd(tmp_path, rng)
    with pytest.raises(ConfigError, match="data.in_channels=3.*6 input"):
        DeblurDataModule(val=DPDD(tmp_path, "test", views=["l", "r"]), in_channels=3)


def test_datamodule_train_loader_yields_the_scheduled_batches():
    module = DeblurDataModule(
        train=SyntheticPairs("train", length=10, image_size=40, kernel_size=3),
        val=SyntheticPairs("val", length=2, image_size=24, kernel_size=3),
        patch_schedule=[[0, 16, 3], [2, 24, 2]],
        num_workers=0,
    )
    batches = list(module.train_dataloader())
    # An epoch is 10 // 3 steps; batches are global (one rank here).
    assert [tuple(b["lq"].shape) for b in batches] == [(3, 3, 16, 16)] * 2 + [(2, 3, 24, 24)]
    whole = list(module.val_dataloader())
    assert len(whole) == 2 and whole[0]["gt"].shape == (1, 3, 24, 24)
    assert WholeImages(module.sources["val"])[1]["name"] == whole[1]["name"][0]


def first_batches(num_workers, count=3):
    module = DeblurDataModule(
        train=SyntheticPairs("train", length=12, image_size=40, kernel_size=5),
        patch_schedule=[[0, 16, 2]],
        num_workers=num_workers,
        seed=5,
    )
    batches = []
    for batch in module.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def test_training_batches_do_not_depend_on_the_number_of_workers():
    for single, parallel in zip(first_batches(0), first_batches(2), strict=True):
        assert single["name"] == parallel["name"]
        assert torch.equal(single["lq"], parallel["lq"]) and torch.equal(single["gt"], parallel["gt"])


def test_a_corrupt_file_read_in_a_worker_surfaces_with_its_name(tmp_path, rng):
    make_folder(tmp_path, rng)
    (tmp_path / "target" / "b.png").write_bytes(b"\x89PNG broken")
    module = DeblurDataModule(val=FolderPairs(tmp_path / "input", tmp_path / "target", verify_sizes=False), num_workers=1)
    with pytest.raises(ImageReadError, match="target/b.png"):
        list(module.val_dataloader())


def test_a_split_without_its_prior_folder_fails_only_when_used(tmp_path, rng):
    make_folder(tmp_path, rng, size=(24, 24), bits=16)
    for name in ("a", "b", "c"):
        write_png(tmp_path / "priors" / "train" / f"{name}.png", random_pixels(rng, 24, 24, 16))
    pairs = FolderPairs(tmp_path / "input", tmp_path / "target")
    module = DeblurDataModule(
        train=pairs, test=pairs, in_channels=6, prior_dir=str(tmp_path / "priors"), patch_schedule=[[0, 16, 3]], num_workers=0
    )
    batch = next(iter(module.train_dataloader()))
    prior = cv2.imread(str(tmp_path / "priors" / "train" / f"{batch['name'][0]}.png"), cv2.IMREAD_UNCHANGED)
    assert batch["lq"].shape == (3, 6, 16, 16) and prior.dtype == np.uint16
    with pytest.raises(DatasetLayoutError, match="priors/test does not exist.*generate_prior"):
        module.test_dataloader()


def compose_data(tmp_path, *overrides):
    from conftest import compose_config
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config("train", tmp_path, *overrides, f"paths.data_dir={tmp_path}").data, resolve=True)


@pytest.mark.parametrize(("data", "views", "read_8bit"), [("dpdd", ["c"], True), ("dpdd_dual", ["l", "r"], False)])
def test_dpdd_evaluation_splits_resolve_without_a_training_split(tmp_path, data, views, read_8bit):
    # README: data.train=null trains from a prepared store alone; val and test keep the dataset's reading.
    resolved = compose_data(tmp_path, f"data={data}", "data.train=null", "data.prepared_dir=store")
    assert resolved["train"] is None
    for split in ("val", "test"):
        assert (resolved[split]["views"], resolved[split]["read_8bit"]) == (views, read_8bit)
    swapped = compose_data(tmp_path, f"data={data}", "data.train.views=[r,l]")
    assert swapped["val"]["views"] == swapped["test"]["views"] == ["r", "l"]


def test_the_readme_data_overrides_compose(tmp_path, rng):
    from hydra.utils import instantiate

    assert compose_data(tmp_path, "data.repeat_small_dataset=true")["repeat_small_dataset"] is True
    gamma = compose_data(tmp_path, "data=gopro", "data.train.blur_folder=blur_gamma")
    for name in ("0001", "0002"):
        write_png(tmp_path / "GoPro" / "train" / "scene" / "blur_gamma" / f"{name}.png", random_pixels(rng, 16, 16))
        write_png(tmp_path / "GoPro" / "train" / "scene" / "sharp" / f"{name}.png", random_pixels(rng, 16, 16))
    assert len(instantiate(gamma["train"])) == 2
    assert compose_data(tmp_path, "data=hide")["test"]["_target_"].endswith("HIDE")


def test_a_validation_split_held_out_of_the_training_pairs(tmp_path, rng):
    from conftest import compose_config

    from deblur_diffusion.cli import split_datamodule
    from deblur_diffusion.data import DeblurDataModule, FolderPairs

    for folder in ("input", "target"):
        (tmp_path / folder).mkdir()
        for index in range(10):
            cv2.imwrite(str(tmp_path / folder / f"{index:02d}.png"), (rng.random((16, 16, 3)) * 255).astype(np.uint8))
    pairs = FolderPairs(tmp_path / "input", tmp_path / "target")
    data = DeblurDataModule(train=pairs, val_fraction=0.2, seed=3, patch_schedule=[[0, 16, 2]], num_workers=0)
    train, val = data.pairs("train"), data.pairs("val")
    train_names = {train.name(i) for i in range(len(train))}
    val_names = [val.name(i) for i in range(len(val))]
    assert len(val_names) == 2 and len(train_names) == 8
    assert train_names.isdisjoint(val_names) and train_names | set(val_names) == {f"{i:02d}" for i in range(10)}
    again = DeblurDataModule(train=pairs, val_fraction=0.2, seed=3, patch_schedule=[[0, 16, 2]], num_workers=0).pairs("val")
    assert [again.name(i) for i in range(len(again))] == val_names
    assert [batch["name"][0] for batch in data.val_dataloader()] == val_names
    trained_on = {name for batch in itertools.islice(data.train_dataloader(), 20) for name in batch["name"]}
    assert trained_on <= train_names
    assert train.provenance() != pairs.provenance()
    # evaluate split=val scores the same held-out pairs.
    overrides = ["ckpt=x", "data=folder", f"data.train.input_dir={tmp_path}/input", f"data.train.target_dir={tmp_path}/target"]
    cfg = compose_config("evaluate", tmp_path, *overrides, "data.val=null", "data.val_fraction=0.2", "data.seed=3", "split=val")
    held_out = split_datamodule(cfg, "val").pairs("val")
    assert [held_out.name(i) for i in range(len(held_out))] == val_names


def test_a_folder_of_sharp_photos_trains_and_validates_on_synthetic_blur(tmp_path):
    from conftest import compose_config
    from hydra.utils import instantiate
    from skimage import data as skdata

    for name in ("astronaut", "coffee", "chelsea", "rocket", "coins"):
        image = getattr(skdata, name)()
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
        cv2.imwrite(str(tmp_path / f"{name}.png"), image[:, :, ::-1])
    overrides = [f"data.train.photo_dir={tmp_path}", "data.train.image_size=48", "data.val.image_size=48", "data.val.length=4"]
    data = instantiate(compose_config("train", tmp_path, "data=sharp_folder", *overrides).data)
    train, val = data.pairs("train"), data.pairs("val")
    held_out = {Path(photo).name for photo in val.photos}
    assert len(held_out) == 1 and held_out.isdisjoint(Path(photo).name for photo in train.photos)
    assert len(train.photos) == 4
    blurry, sharp = val.load(0, np.random.default_rng(0))
    again_blurry, again_sharp = val.load(0, np.random.default_rng(99))  # validation ignores the caller's rng
    np.testing.assert_array_equal(blurry, again_blurry)
    np.testing.assert_array_equal(sharp, again_sharp)
    photo = cv2.imread(str(tmp_path / held_out.pop()))[:, :, ::-1].astype(np.float32) / 255
    assert sharp.shape == (48, 48, 3) and blurry.shape == (48, 48, 3)
    # The validation crop comes from the held-out photograph (rescaled, so compare value ranges).
    assert photo.min() <= sharp.min() and sharp.max() <= photo.max()
    assert np.abs(blurry - sharp).mean() > 1e-3  # blurred
    assert all(name.startswith("000") for name in (val.name(i) for i in range(len(val))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds 0 images; at least 2 are needed"):
        SyntheticPairs("train", photo_dir=tmp_path / "empty")
