"""Pair sources read from disk: a generic folder or list of pairs, and the benchmark layouts.

Every source checks its layout when it is built (before any training starts): missing folders,
unequal file counts, unmatched names and, with ``verify_sizes``, pairs of different sizes raise an
error that names the expected layout and the files at fault.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from deblur_diffusion.data.io import image_bit_depth, image_size, list_images, read_image_raw
from deblur_diffusion.data.sources import PairPlanes, StoredPairSource
from deblur_diffusion.errors import DatasetLayoutError, ImageReadError, PairMismatchError

_DATA_DIR_HINT = "Set paths.data_dir (or the DEBLUR_DATA environment variable) to the folder that holds the datasets."


def _require_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{dataset}: folder {path} not found. Expected layout:\n{layout}\n{_DATA_DIR_HINT}")
    return path


def as_unpacked(root: Path, archive_folders: Sequence[str]) -> Path:
    """``root``, or, when it does not exist, the folder the official archive unpacks to beside it
    (``GOPRO_Large`` for ``GoPro``), so that a dataset works as unpacked, without renaming."""
    if root.exists():
        return root
    return next((root.parent / name for name in archive_folders if (root.parent / name).is_dir()), root)


def _require_images(folder: Path, dataset: str, layout: str) -> list[Path]:
    files = list_images(_require_dir(folder, dataset, layout))
    if not files:
        raise DatasetLayoutError(f"{dataset}: no images in {folder}. Expected layout:\n{layout}")
    return files


def _match_by_stem(inputs: list[Path], targets: list[Path], dataset: str) -> list[tuple[Path, Path]]:
    """Pairs files of two folders by file name (stem); every file must have a partner."""
    input_by_stem = {p.stem: p for p in inputs}
    target_by_stem = {p.stem: p for p in targets}
    only_inputs = sorted(set(input_by_stem) - set(target_by_stem))
    only_targets = sorted(set(target_by_stem) - set(input_by_stem))
    if only_inputs or only_targets:
        details = []
        if only_inputs:
            details.append(f"{len(only_inputs)} inputs without target in {targets[0].parent}, e.g. {only_inputs[:3]}")
        if only_targets:
            details.append(f"{len(only_targets)} targets without input in {inputs[0].parent}, e.g. {only_targets[:3]}")
        raise PairMismatchError(
            f"{dataset}: {len(inputs)} inputs and {len(targets)} targets do not pair up by file name: " + "; ".join(details)
        )
    return [(input_by_stem[stem], target_by_stem[stem]) for stem in sorted(target_by_stem)]


def _paired_folders(input_dir: Path, target_dir: Path, dataset: str, layout: str) -> list[tuple[Path, Path]]:
    """(input, target) files of two folders paired by name; both folders must exist and hold images."""
    return _match_by_stem(_require_images(input_dir, dataset, layout), _require_images(target_dir, dataset, layout), dataset)


# Path parts that identify a file within a dataset (split or view folder, subfolder, name).
FILE_PARTS = 3


class PairedFiles(StoredPairSource):
    """Pairs of files: one or more input views (concatenated on channels) and one target.

    Args:
        inputs: for each pair, the input files (1 for a single image, 2 or 3 for dual-pixel views).
        targets: the sharp image of each pair.
        names: a unique name per pair (defaults to the target file stem).
        dataset: the dataset's name, for error messages.
        verify_sizes: read every header now and reject pairs whose sizes differ.
        read_8bit: decode every file as ``cv2.imread(path)`` does (16-bit files become 8-bit), as
            Restormer's single-image DPDD code reads its data.
    """

    def __init__(
        self,
        inputs: Sequence[Sequence[Path]],
        targets: Sequence[Path],
        names: Sequence[str] | None = None,
        dataset: str = "folder",
        verify_sizes: bool = True,
        read_8bit: bool = False,
    ):
        if len(inputs) != len(targets):
            raise PairMismatchError(f"{dataset}: {len(inputs)} inputs but {len(targets)} targets")
        if not targets:
            raise DatasetLayoutError(f"{dataset}: the dataset has no pairs")
        views = {len(files) for files in inputs}
        if len(views) != 1:
            raise PairMismatchError(f"{dataset}: pairs have different numbers of input views {sorted(views)}")
        self.inputs = [[Path(f) for f in files] for files in inputs]
        self.targets = [Path(t) for t in targets]
        self.names = list(names) if names is not None else [t.stem for t in self.targets]
        if len(set(self.names)) != len(self.names):
            raise PairMismatchError(f"{dataset}: pair names are not unique; use a layout that keeps scene folders")
        self.dataset = dataset
        self.read_8bit = read_8bit
        self.in_channels = 3 * views.pop()
        self._check_files_exist()
        if verify_sizes:
            self.verify_sizes()

    def _check_files_exist(self) -> None:
        for files, target in zip(self.inputs, self.targets, strict=True):
            for path in (*files, target):
                if not path.is_file():
                    raise ImageReadError(f"{self.dataset}: image {path} does not exist")

    def verify_sizes(self) -> None:
        """Reads every header and raises if the files of a pair differ in size."""
        for files, target in zip(self.inputs, self.targets, strict=True):
            expected = image_size(target)
            for path in files:
                size = image_size(path)
                if size != expected:
                    raise PairMismatchError(
                        f"{self.dataset}: input {path} is {size[0]}x{size[1]} but its target {target} is {expected[0]}x{expected[1]}"
                    )

    def __len__(self) -> int:
        return len(self.targets)

    def name(self, index: int) -> str:
        return self.names[index]

    def bit_depth(self, index: int) -> int:
        return 8 if self.read_8bit else image_bit_depth(self.inputs[index][0])

    def file_suffix(self, index: int) -> str:
        return self.inputs[index][0].suffix

    def files(self, index: int) -> list[Path]:
        return [*self.inputs[index], self.targets[index]]

    def load_planes(self, index: int, rng: np.random.Generator | None = None) -> PairPlanes:
        target_path = self.targets[index]
        gt = read_image_raw(target_path, self.read_8bit)
        views = []
        for path in self.inputs[index]:
            view = read_image_raw(path, self.read_8bit)
            if view.shape != gt.shape:
                raise PairMismatchError(
                    f"{self.dataset}: input {path} is {view.shape[0]}x{view.shape[1]} but its target {target_path} "
                    f"is {gt.shape[0]}x{gt.shape[1]}"
                )
            views.append(view)
        return PairPlanes(views, gt)

    def sharpness_target(self, index: int) -> np.ndarray:
        return read_image_raw(self.targets[index]) if self.read_8bit else self.load_planes(index).target

    def describe(self) -> str:
        read = ", read as 8-bit" if self.read_8bit else ""
        return f"{self.dataset}: {len(self)} pairs, {self.in_channels} input channels{read}"

    def provenance(self) -> dict:
        """The description and a digest of every pair's files by their last three path parts
        (``train_l/source/x.png``, ``scene/blur_gamma/x.png``): the dataset may move, but the view
        order or the blurred frames it reads may not change."""
        files = "\n".join(" ".join("/".join(path.parts[-FILE_PARTS:]) for path in self.files(index)) for index in range(len(self)))
        return {**super().provenance(), "files_sha1": hashlib.sha1(files.encode()).hexdigest()}


class FolderPairs(PairedFiles):
    """A generic dataset: an input folder and a target folder with the same file names."""

    def __init__(self, input_dir: str | Path, target_dir: str | Path, verify_sizes: bool = True):
        input_dir, target_dir = Path(input_dir), Path(target_dir)
        layout = f"  {input_dir}/<name>.png  (blurry)\n  {target_dir}/<name>.png  (sharp, same file names)"
        pairs = _paired_folders(input_dir, target_dir, "folder", layout)
        super().__init__([[i] for i, _ in pairs], [t for _, t in pairs], dataset="folder", verify_sizes=verify_sizes)


class PairListFile(PairedFiles):
    """Pairs listed in a text file, one pair per line, paths relative to ``root``.

    ``columns`` gives the order of the paths on a line: RealBlur's lists are ``[target, input]``.
    """

    def __init__(
        self,
        list_file: str | Path,
        root: str | Path | None = None,
        columns: Sequence[str] = ("input", "target"),
        dataset: str = "pair list",
        verify_sizes: bool = True,
    ):
        list_file = Path(list_file)
        if sorted(columns) != ["input", "target"]:
            raise ValueError(f"columns must name 'input' and 'target' once each, got {list(columns)}")
        if not list_file.is_file():
            raise DatasetLayoutError(
                f"{dataset}: list file {list_file} not found. Expected a text file with one pair per line: "
                f"'{' '.join(f'<{c} path>' for c in columns)}', relative to {root or list_file.parent}.\n{_DATA_DIR_HINT}"
            )
        root = Path(root) if root is not None else list_file.parent
        inputs, targets = [], []
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetLayoutError(f"{list_file}:{number}: expected 2 paths, found {len(fields)}: {line!r}")
            paths = dict(zip(columns, fields, strict=True))
            target = root / paths["target"]
            inputs.append([root / paths["input"]])
            targets.append(target)
        super().__init__(inputs, targets, _names_without_common_prefix(targets), dataset=dataset, verify_sizes=verify_sizes)


def _names_without_common_prefix(paths: Sequence[Path]) -> list[str]:
    """Unique names from paths: the parts after the folders that all paths share, joined by '_'."""
    parts = [p.with_suffix("").parts for p in paths]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return ["_".join(p[shared:]) for p in parts]


class GoPro(PairedFiles):
    """GoPro (Nah et al.), in either the original scene layout or the flat input/target layout.

    Original ``GOPRO_Large``: ``root/<split>/<scene>/{blur,blur_gamma,sharp}/<frame>.png``.
    Flat (Restormer's preparation): ``root/<split>/{input,target}/<name>.png``. A missing ``root``
    is looked for as the archive unpacks beside it: ``GOPRO_Large/``.
    """

    dataset = "GoPro"
    archive_folders = ("GOPRO_Large",)

    def __init__(self, root: str | Path, split: str = "train", blur_folder: str = "blur", verify_sizes: bool = True):
        given = Path(root)
        root = as_unpacked(given, self.archive_folders)
        split_dir = root / split
        layout = (
            f"  {split_dir}/input/*.png and {split_dir}/target/*.png   (flat layout)\n"
            f"or {split_dir}/<scene>/{blur_folder}/*.png and {split_dir}/<scene>/sharp/*.png   (original GOPRO_Large)\n"
            f"or the archive as it unpacks: {given.parent}/GOPRO_Large/{split}/<scene>/..."
        )
        _require_dir(split_dir, self.dataset, layout)
        if (split_dir / "input").is_dir():
            pairs = _paired_folders(split_dir / "input", split_dir / "target", self.dataset, layout)
            inputs, targets = [[i] for i, _ in pairs], [t for _, t in pairs]
            names = [t.stem for t in targets]
        else:
            scenes = sorted(d for d in split_dir.iterdir() if (d / "sharp").is_dir())
            if not scenes:
                raise DatasetLayoutError(f"{self.dataset}: no scene folders with sharp/ in {split_dir}. Expected:\n{layout}")
            inputs, targets, names = [], [], []
            for scene in scenes:
                pairs = _paired_folders(scene / blur_folder, scene / "sharp", self.dataset, layout)
                inputs += [[i] for i, _ in pairs]
                targets += [t for _, t in pairs]
                names += [f"{scene.name}_{t.stem}" for _, t in pairs]
        super().__init__(inputs, targets, names, dataset=self.dataset, verify_sizes=verify_sizes)


class HIDE(PairedFiles):
    """HIDE (Shen et al.) test set, flat ``root/<split>/{input,target}`` or the original layout
    ``root/<split>/{test-close-ups,test-long-shot}/*.png`` with sharp images in ``root/GT``; a
    missing ``root`` is looked for as the archive unpacks beside it: ``HIDE_dataset/``."""

    dataset = "HIDE"
    archive_folders = ("HIDE_dataset",)

    def __init__(self, root: str | Path, split: str = "test", verify_sizes: bool = True):
        given = Path(root)
        root = as_unpacked(given, self.archive_folders)
        split_dir = root / split
        layout = (
            f"  {split_dir}/input/*.png and {split_dir}/target/*.png   (flat layout)\n"
            f"or {split_dir}/test-close-ups/*.png, {split_dir}/test-long-shot/*.png and {root}/GT/*.png   (original)\n"
            f"or the archive as it unpacks: {given.parent}/HIDE_dataset/{{GT,{split}}}/..."
        )
        _require_dir(split_dir, self.dataset, layout)
        if (split_dir / "input").is_dir():
            pairs = _paired_folders(split_dir / "input", split_dir / "target", self.dataset, layout)
        else:
            blurry = [p for sub in sorted(split_dir.iterdir()) if sub.is_dir() for p in list_images(sub)]
            if not blurry:
                raise DatasetLayoutError(f"{self.dataset}: no blurry images under {split_dir}. Expected:\n{layout}")
            blurry_names = {b.stem for b in blurry}
            sharp = [s for s in _require_images(root / "GT", self.dataset, layout) if s.stem in blurry_names]
            pairs = _match_by_stem(blurry, sharp, self.dataset)
        super().__init__([[i] for i, _ in pairs], [t for _, t in pairs], dataset=self.dataset, verify_sizes=verify_sizes)


class RealBlur(PairedFiles):
    """RealBlur-J or -R (Rim et al.).

    Either the official pair lists, e.g. ``root/RealBlur_J_test_list.txt`` whose lines read
    ``<gt path> <blur path>`` relative to ``root`` (the folders of ``RealBlur.tar.gz`` as it unpacks,
    ``RealBlur-J_ECC_IMCORR_centroid_itensity_ref/scene*/{gt,blur}/``, beside them), or the folders
    that Restormer's and HI-Diff's instructions use, ``root/<split>/RealBlur_J/{input,target}/*.png``.
    An archive unpacked straight into ``root``'s parent folder is found there.
    """

    # The folder of each variant in RealBlur.tar.gz.
    unpacked_folders: ClassVar[dict[str, str]] = {
        "J": "RealBlur-J_ECC_IMCORR_centroid_itensity_ref",
        "R": "RealBlur-R_BM3D_ECC_IMCORR_centroid_itensity_ref",
    }

    def __init__(self, root: str | Path, variant: str = "J", split: str = "train", verify_sizes: bool = True):
        if variant not in ("J", "R"):
            raise ValueError(f"RealBlur variant must be 'J' or 'R', got {variant!r}")
        root = Path(root)
        unpacked = self.unpacked_folders[variant]
        if not root.exists() and (root.parent / unpacked).is_dir():
            root = root.parent
        dataset = f"RealBlur-{variant}"
        list_file = root / f"RealBlur_{variant}_{split}_list.txt"
        relaid = root / split / f"RealBlur_{variant}"
        if not list_file.is_file() and not relaid.is_dir() and (root / unpacked).is_dir():
            raise DatasetLayoutError(
                f"{dataset}: {root / unpacked} is there but not the list of its {split} pairs, {list_file}. The official "
                f"lists (RealBlur_{variant}_train_list.txt, RealBlur_{variant}_test_list.txt: '<gt path> <blur path>' per line) "
                f"are in the datalist/ folder of github.com/rimchang/SRN-Deblur: put them in {root}"
            )
        if not list_file.is_file() and relaid.is_dir():
            layout = f"  {relaid}/input/*.png and {relaid}/target/*.png"
            pairs = _paired_folders(relaid / "input", relaid / "target", dataset, layout)
            super().__init__([[i] for i, _ in pairs], [t for _, t in pairs], dataset=dataset, verify_sizes=verify_sizes)
            return
        listed = PairListFile(list_file, root, columns=("target", "input"), dataset=dataset, verify_sizes=verify_sizes)
        super().__init__(listed.inputs, listed.targets, listed.names, dataset=dataset, verify_sizes=False)


DPDD_VIEWS = {"c": "combined", "l": "left", "r": "right"}


class DPDD(PairedFiles):
    """Canon DPDD (Abuolaim and Brown), 16-bit PNGs.

    Layouts: the original ``root/<split>_c/{source,target}``, ``root/<split>_l/source``,
    ``root/<split>_r/source``, or the re-laid ``root/<split>/{inputC,inputL,inputR,target}`` of
    Restormer's and Swintormer's scripts. ``views`` chooses the input: ``["c"]`` for single-image
    defocus deblurring, ``["l", "r"]`` (or ``["r", "l"]``) for dual-pixel, whose views are
    concatenated in that order into 6 channels. ``read_8bit`` reads as Restormer's single-image code
    does (``cv2.imread(path)``: 8 bits). A missing ``root`` is looked for as the archive unpacks
    beside it: ``dd_dp_dataset_canon/`` or ``dd_dp_dataset_png/``.
    """

    dataset = "DPDD"
    # The Canon archive (dd_dp_dataset_canon.zip) unpacks to dd_dp_dataset_canon/; some copies hold
    # the PNG folders one level down, as dd_dp_dataset_png/.
    archive_folders = ("dd_dp_dataset_png", "dd_dp_dataset_canon", "dd_dp_dataset_canon/dd_dp_dataset_png")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        views: Sequence[str] = ("c",),
        verify_sizes: bool = True,
        read_8bit: bool = False,
    ):
        given = Path(root)
        root = as_unpacked(given, self.archive_folders)
        unknown = [v for v in views if v not in DPDD_VIEWS]
        if unknown or not views:
            raise ValueError(f"DPDD views must be a non-empty list of {list(DPDD_VIEWS)}, got {list(views)}")
        relaid = root / split
        if not (root / f"{split}_c").is_dir() and (relaid / "target").is_dir():
            target_dir = relaid / "target"
            view_dirs = {v: relaid / f"input{v.upper()}" for v in DPDD_VIEWS}
        else:
            target_dir = root / f"{split}_c" / "target"
            view_dirs = {v: root / f"{split}_{v}" / "source" for v in DPDD_VIEWS}
        layout = "\n".join(
            [f"  {target_dir}/*.png   (sharp)"]
            + [f"  {view_dirs[v]}/*.png   ({DPDD_VIEWS[v]} view)" for v in DPDD_VIEWS]
            + [f"or the re-laid {relaid}/{{inputC,inputL,inputR,target}}/*.png"]
            + [f"or the archive as it unpacks: {given.parent}/dd_dp_dataset_canon/{split}_{{c,l,r}}/... (or dd_dp_dataset_png/)"]
        )
        targets = _require_images(target_dir, self.dataset, layout)
        view_files = []
        for view in views:
            pairs = _match_by_stem(_require_images(view_dirs[view], self.dataset, layout), targets, self.dataset)
            view_files.append([i for i, _ in pairs])
        inputs = [list(files) for files in zip(*view_files, strict=True)]
        super().__init__(
            inputs, sorted(targets, key=lambda p: p.stem), dataset=self.dataset, verify_sizes=verify_sizes, read_8bit=read_8bit
        )
