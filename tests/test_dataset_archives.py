"""Datasets as their archives unpack, found by the data configs without renaming or re-laying,
and settings checked when the config is composed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from deblur_diffusion.data.io import write_image
from deblur_diffusion.errors import DatasetLayoutError

RNG = np.random.default_rng(0)
# A layout error arrives as it is, or wrapped by Hydra when it builds the dataset from its config.
LAYOUT_ERRORS = (DatasetLayoutError, InstantiationException)


def _image(path, bit_depth=8):
    write_image(path, RNG.random((12, 16, 3)), bit_depth)


def _split(tmp_path, data: str, split: str, *overrides: str):
    cfg = compose_config("train", tmp_path, f"data={data}", f"paths.data_dir={tmp_path}", *overrides)
    return instantiate(cfg.data[split])


def test_gopro_as_gopro_large_unpacks(tmp_path):
    for split, scenes in (("train", ("GOPR0372_07_00", "GOPR0374_11_00")), ("test", ("GOPR0384_11_00",))):
        for scene in scenes:
            for folder in ("blur", "blur_gamma", "sharp"):
                for frame in ("000047", "000048"):
                    _image(tmp_path / "GOPRO_Large" / split / scene / folder / f"{frame}.png")
    train = _split(tmp_path, "gopro", "train")
    assert len(train) == 4 and train.name(0) == "GOPR0372_07_00_000047"
    assert len(_split(tmp_path, "gopro", "val")) == 2


def test_hide_as_hide_dataset_unpacks(tmp_path):
    for folder, names in (("test/test-close-ups", ("1fromGOPR0950",)), ("test/test-long-shot", ("10fromGOPR0969", "11fromGOPR0969"))):
        for name in names:
            _image(tmp_path / "HIDE_dataset" / folder / f"{name}.png")
            _image(tmp_path / "HIDE_dataset" / "GT" / f"{name}.png")
    _image(tmp_path / "HIDE_dataset" / "GT" / "99fromGOPR0999.png")  # a training frame's sharp image
    assert len(_split(tmp_path, "hide", "test")) == 3


def test_dpdd_as_the_canon_archive_unpacks(tmp_path):
    for split in ("train", "val", "test"):
        for name in ("1P0A1234", "1P0A1235"):
            _image(tmp_path / "dd_dp_dataset_canon" / f"{split}_c" / "target" / f"{name}.png", 16)
            for view in "clr":
                _image(tmp_path / "dd_dp_dataset_canon" / f"{split}_{view}" / "source" / f"{name}.png", 16)
    test = _split(tmp_path, "dpdd_dual", "test")
    assert len(test) == 2 and test.in_channels == 6


def test_realblur_as_its_tarball_unpacks_with_the_official_lists(tmp_path):
    unpacked = "RealBlur-J_ECC_IMCORR_centroid_itensity_ref"
    lines = []
    for scene, frames in (("scene230", (1, 7)), ("scene231", (2,))):
        for frame in frames:
            _image(tmp_path / unpacked / scene / "gt" / f"gt_{frame}.png")
            _image(tmp_path / unpacked / scene / "blur" / f"blur_{frame}.png")
            lines.append(f"{unpacked}/{scene}/gt/gt_{frame}.png {unpacked}/{scene}/blur/blur_{frame}.png ")  # trailing space, as theirs
    with pytest.raises(LAYOUT_ERRORS, match=r"is there but not the list of its test pairs.*rimchang/SRN-Deblur"):
        _split(tmp_path, "realblur_j", "val")
    (tmp_path / "RealBlur_J_test_list.txt").write_text("\n".join(lines) + "\n")
    test = _split(tmp_path, "realblur_j", "val")  # unpacked straight into the data folder: found there
    assert len(test) == 3 and str(test.files(0)[0]).endswith("scene230/blur/blur_1.png")


def test_a_wrong_layout_names_the_expected_one_and_the_archive_folder(tmp_path):
    (tmp_path / "GoPro" / "train" / "scene" / "blurry").mkdir(parents=True)
    with pytest.raises(LAYOUT_ERRORS, match=r"no scene folders with sharp/ .*GOPRO_Large"):
        _split(tmp_path, "gopro", "train")
    with pytest.raises(LAYOUT_ERRORS, match=r"dd_dp_dataset_canon/test_\{c,l,r\}"):
        _split(tmp_path, "dpdd", "test")


@pytest.mark.parametrize(
    ("entry_point", "override", "key"),
    [
        ("train", "evaluate_checkpoint=bets", "evaluate_checkpoint"),
        ("train", "test=maybe", "test"),
        ("evaluate", "split=train", "split"),
        ("predict", "precision=fp8", "precision"),
        ("predict", "jpeg_quality=high", "jpeg_quality"),
        ("export", "format=tflite", "format"),
        ("generate_prior", "prior=decoded", "prior"),
    ],
)
def test_a_wrong_setting_fails_when_the_config_is_composed(tmp_path, entry_point, override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        compose_config(entry_point, tmp_path, override)
    assert key in str(error.value) + str(error.value.__cause__)
