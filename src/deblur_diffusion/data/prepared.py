"""The official training crops, prepared once into an LMDB store that patches are read from.

The official pipelines never train from full frames: they first cut each training image into
512 px crops (GoPro and the other motion-blur sets: every 256 px; DPDD: every 204 px, keeping the
70 % sharpest crops of each image) and sample random patches from those crops. ``prepare_store``
writes the same crops, every plane of a pair (input views, prior, target) as stored (uint8 or
uint16), into an LMDB environment. Reading a patch maps the crop's pages and copies only the patch:
no image is decoded at training time.

LMDB because the measurement in ``benchmarks/data_throughput.py`` favours it (see
``benchmarks/README.md``): with raw pixels it reads patches at the rate of a memory-mapped array,
in one file, with concurrent readers in every data worker; PNG-encoded values (``encoding=png``,
BasicSR's way) take a half to three quarters of the space but decode a whole crop per patch.

Layout of a store folder: ``crops.lmdb/`` (values ``<crop>.<plane>``) and ``manifest.json``
(the settings it was made with, the source files, the crop rule and one record per crop). A
store is written pair by pair; an interrupted run resumes after the last complete pair, and a run
with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import lmdb
import numpy as np

from deblur_diffusion.data.io import decode_image, write_atomically
from deblur_diffusion.data.sources import PairPlanes, PairSource, StoredPairSource
from deblur_diffusion.errors import ConfigError, DatasetLayoutError, ImageReadError

STORE_FORMAT = "deblur-diffusion prepared crops"
STORE_VERSION = 1
ENCODINGS = ("raw", "png")
MANIFEST = "manifest.json"
LMDB_DIR = "crops.lmdb"
# LMDB maps its file at a fixed size, reserving that much address space (not disk): the writer
# starts at 1 GiB and doubles when a pair does not fit, so no terabyte map meets a cluster's
# `ulimit -v`. Readers map the size the file records.
INITIAL_MAP_SIZE = 1 << 30
_PAIRS_DONE_KEY = b"__pairs_done__"
# Restormer's generate_patches_dpdd.py: Sobel kernel sizes whose sharpness scores are multiplied.
SHARPNESS_KERNEL_SIZES = (3, 7, 11, 15)


@dataclass(frozen=True)
class CropRule:
    """Where the crops of an image lie, and which are kept.

    Along each axis, crops start every ``stride`` pixels while they fit, plus one flush with the far
    border (the official scripts' rule: GoPro 512/256, DPDD 512/204); an image smaller than ``size``
    gives one crop of its whole extent. ``keep_sharpest`` < 1 keeps that fraction of each image's
    crops, dropping the least sharp target crops first (DPDD: 0.7).
    """

    size: int = 512
    stride: int = 256
    keep_sharpest: float = 1.0

    def __post_init__(self):
        if self.size < 1 or self.stride < 1:
            raise ConfigError(f"crop size and stride must be positive, got size={self.size} stride={self.stride}")
        if not 0.0 < self.keep_sharpest <= 1.0:
            raise ConfigError(f"crops.keep_sharpest must be in (0, 1], got {self.keep_sharpest}")

    def starts(self, length: int) -> list[int]:
        if length <= self.size:
            return [0]
        return sorted({*range(0, length - self.size + 1, self.stride), length - self.size})

    def windows(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of every crop, row by row."""
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def kept(self, target_crops: list[np.ndarray]) -> list[bool]:
        """Which crops survive the sharpness filter (all of them when ``keep_sharpest`` is 1)."""
        count = len(target_crops)
        dropped = int((1.0 - self.keep_sharpest) * count + 1e-9)
        if dropped == 0:
            return [True] * count
        scores = sharpness_scores(target_crops)
        # Stable: among equal scores the earlier crop is dropped first, as the official argmin loop does.
        least_sharp = np.argsort(scores, kind="stable")[:dropped]
        keep = [True] * count
        for index in least_sharp:
            keep[index] = False
        return keep


def sharpness_scores(target_crops: list[np.ndarray]) -> np.ndarray:
    """Restormer's DPDD crop sharpness: for each Sobel kernel size, the sum over the gray crop of the
    gradient magnitude, min-max normalised over the image's crops; the product over kernel sizes.
    A kernel size at which every crop scores the same contributes NaN, as in the official script,
    which then drops crops in order."""
    grays = [cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY) for crop in target_crops]
    product = np.ones(len(grays))
    for ksize in SHARPNESS_KERNEL_SIZES:
        sums = np.array([_gradient_magnitude_sum(gray, ksize) for gray in grays])
        shifted = sums - sums.min()
        with np.errstate(invalid="ignore", divide="ignore"):
            product = product * (shifted / shifted.max())
    return np.nan_to_num(product, nan=-1.0)


def _gradient_magnitude_sum(gray: np.ndarray, ksize: int) -> float:
    dx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=ksize)
    dy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=ksize)
    return float(np.sqrt(dx * dx + dy * dy).sum())


def source_settings(source: PairSource, rule: CropRule) -> dict:
    """What a store's crops depend on; a store is only used with the settings it was made with."""
    names = "\n".join(source.name(index) for index in range(len(source)))
    return {
        **source.provenance(),
        "pairs": len(source),
        "pair_names_sha1": hashlib.sha1(names.encode()).hexdigest(),
        "in_channels": source.in_channels,
        "read_8bit": source.read_8bit,
        "crops": asdict(rule),
    }


def _settings_difference(made_with: dict, requested: dict) -> list[str]:
    return [
        f"{key}: store {made_with.get(key)!r}, requested {requested.get(key)!r}"
        for key in sorted(set(made_with) | set(requested))
        if made_with.get(key) != requested.get(key)
    ]


def _plane_key(crop: int, plane: int) -> bytes:
    return f"{crop:09d}.{plane}".encode()


def _encode(pixels: np.ndarray, encoding: str) -> bytes:
    pixels = np.ascontiguousarray(pixels)
    if encoding == "raw":
        return pixels.tobytes()
    ok, encoded = cv2.imencode(".png", pixels[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ImageReadError(f"cannot encode a {pixels.dtype} crop as PNG")
    return encoded.tobytes()


def _read_manifest(store: Path) -> dict | None:
    path = store / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(f"prepared store {store}: {path} is not valid JSON ({err}); delete the folder and prepare again") from err
    if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
        raise DatasetLayoutError(
            f"{store} is not a prepared store of this version ({path} says {manifest.get('format')!r} v{manifest.get('version')})"
        )
    return manifest


def _write_manifest(store: Path, manifest: dict) -> None:
    write_atomically(store / MANIFEST, json.dumps(manifest, indent=1))


def prepare_store(
    source: PairSource,
    out: str | Path,
    rule: CropRule,
    encoding: str = "raw",
    overwrite: bool = False,
    progress: Callable[[Iterator[int], int], Iterator[int]] | None = None,
) -> dict:
    """Writes the crops of every pair of ``source`` to the store ``out`` and returns its manifest.

    Resumes a store made with the same settings (pairs already written are skipped); refuses one
    made with other settings unless ``overwrite``. ``progress`` wraps the loop over pairs (a
    progress bar).
    """
    if encoding not in ENCODINGS:
        raise ConfigError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    store = Path(out)
    settings = source_settings(source, rule)
    manifest = _read_manifest(store)
    if manifest is not None and (manifest["settings"], manifest["encoding"]) != (settings, encoding):
        if not overwrite:
            raise ConfigError(
                f"prepared store {store} was made with other settings:\n  "
                + "\n  ".join(
                    _settings_difference({**manifest["settings"], "encoding": manifest["encoding"]}, {**settings, "encoding": encoding})
                )
                + "\nChoose another out=, or overwrite=true to replace it."
            )
        manifest = None
    if manifest is None:
        if (store / LMDB_DIR).exists():
            for file in (store / LMDB_DIR).iterdir():
                file.unlink()
        store.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "settings": settings,
            "encoding": encoding,
            "complete": False,
            "planes": None,
            "files": [[str(f) for f in source.files(index)] for index in range(len(source))],
            "crops": [],
        }
        _write_manifest(store, manifest)
    if manifest["complete"]:
        return manifest

    env = lmdb.open(str(store / LMDB_DIR), map_size=INITIAL_MAP_SIZE, subdir=True)
    try:
        with env.begin() as txn:
            done = int(txn.get(_PAIRS_DONE_KEY, b"0"))
            crops = [json.loads(txn.get(f"record.{pair:09d}".encode())) for pair in range(done)]
        records = [record for pair_records in crops for record in pair_records]
        pairs = range(done, len(source))
        for pair in progress(iter(pairs), len(pairs)) if progress else pairs:
            planes = source.load_planes(pair, np.random.default_rng(pair))
            ranked = source.sharpness_target(pair) if rule.keep_sharpest < 1.0 else planes.target
            while True:
                try:
                    pair_records = _write_pair_crops(env, source, pair, planes, ranked, rule, encoding, len(records))
                    break
                except lmdb.MapFullError:  # the transaction was aborted: nothing of the pair is written
                    env.set_mapsize(2 * env.info()["map_size"])
            records += pair_records
            if manifest["planes"] is None:
                manifest["planes"] = [{"channels": p.shape[2], "dtype": p.dtype.name} for p in (*planes.inputs, planes.target)]
                _write_manifest(store, manifest)
    finally:
        env.close()
    manifest["crops"] = records
    manifest["complete"] = True
    _write_manifest(store, manifest)
    return manifest


def _write_pair_crops(
    env: lmdb.Environment,
    source: PairSource,
    pair: int,
    planes: PairPlanes,
    ranked: np.ndarray,
    rule: CropRule,
    encoding: str,
    first: int,
) -> list[list]:
    """Writes one pair's kept crops and marks the pair done, in one transaction (all or nothing).
    ``ranked`` is the target whose crops are ranked by sharpness (:meth:`PairSource.sharpness_target`)."""
    height, width = planes.target.shape[:2]
    windows = rule.windows(height, width)
    cut = [planes.map(lambda plane, top=top, left=left: plane[top : top + rule.size, left : left + rule.size]) for top, left in windows]
    kept = rule.kept([ranked[top : top + rule.size, left : left + rule.size] for top, left in windows])
    records = []
    with env.begin(write=True) as txn:
        for (top, left), crop, keep in zip(windows, cut, kept, strict=True):
            if not keep:
                continue
            index = first + len(records)
            for plane_index, plane in enumerate((*crop.inputs, crop.target)):
                txn.put(_plane_key(index, plane_index), _encode(plane, encoding))
            # Named as the official scripts name their crop files: <image>-<n>, n from 1.
            records.append([f"{source.name(pair)}-{len(records) + 1}", pair, top, left, *crop.target.shape[:2]])
        txn.put(f"record.{pair:09d}".encode(), json.dumps(records).encode())
        txn.put(_PAIRS_DONE_KEY, str(pair + 1).encode())
    return records


class PreparedCrops(StoredPairSource):
    """The crops of a prepared store as a pair source: item ``i`` is crop ``i``.

    Args:
        store: the folder written by ``python -m deblur_diffusion.data.prepare``.
        expected: the settings of the configured training source (:func:`source_settings`); a store
            made with other settings is refused, naming the differences. None skips the check (a
            machine that holds the store but not the original dataset).
    """

    def __init__(self, store: str | Path, expected: dict | None = None):
        self.store = Path(store)
        manifest = _read_manifest(self.store)
        if manifest is None:
            raise DatasetLayoutError(
                f"no prepared store in {self.store} ({MANIFEST} missing): write it with "
                f"python -m deblur_diffusion.data.prepare data=... out={self.store}"
            )
        if not manifest["complete"]:
            raise DatasetLayoutError(
                f"prepared store {self.store} is incomplete (preparation was interrupted): run the same "
                "python -m deblur_diffusion.data.prepare command again to finish it"
            )
        if expected is not None and manifest["settings"] != expected:
            raise ConfigError(
                f"data.prepared_dir={self.store} was made with other settings than this data config:\n  "
                + "\n  ".join(_settings_difference(manifest["settings"], expected))
                + "\nPrepare a store for this config (python -m deblur_diffusion.data.prepare data=... out=DIR)."
            )
        self.settings = manifest["settings"]
        self.encoding = manifest["encoding"]
        self.in_channels = self.settings["in_channels"]
        self.read_8bit = self.settings["read_8bit"]
        self.planes = manifest["planes"]
        self.records = manifest["crops"]
        if not self.records:
            raise DatasetLayoutError(f"prepared store {self.store} holds no crops")
        self._env = None
        self._txn = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.records)

    def name(self, index: int) -> str:
        return self.records[index][0]

    def bit_depth(self, index: int) -> int:
        return 16 if self.planes[0]["dtype"] == "uint16" else 8

    def _transaction(self) -> lmdb.Transaction:
        # One read-only transaction per process, opened after the data workers fork; its buffers
        # point into LMDB's memory map and stay valid while it lives. A worker forked after the
        # parent read the store inherits the parent's environment, which LMDB forbids using and
        # py-lmdb refuses to open twice: the worker closes its copy first (the parent's is untouched).
        if self._pid != os.getpid():
            if self._env is not None:
                self._txn = None
                self._env.close()
            self._env = lmdb.open(str(self.store / LMDB_DIR), readonly=True, lock=False, readahead=False, meminit=False)
            self._txn = self._env.begin(buffers=True)
            self._pid = os.getpid()
        return self._txn

    def _plane(self, index: int, plane: int) -> np.ndarray:
        value = self._transaction().get(_plane_key(index, plane))
        if value is None:
            raise ImageReadError(f"prepared store {self.store}: crop {index} plane {plane} is missing; prepare it again")
        if self.encoding == "png":
            return decode_image(np.frombuffer(value, np.uint8), f"{self.store} crop {index} plane {plane}")
        height, width = self.records[index][4:6]
        layout = self.planes[plane]
        return np.frombuffer(value, dtype=layout["dtype"]).reshape(height, width, layout["channels"])

    def load_planes(self, index: int, rng: np.random.Generator | None = None) -> PairPlanes:
        planes = [self._plane(index, plane) for plane in range(len(self.planes))]
        return PairPlanes(planes[:-1], planes[-1])

    def describe(self) -> str:
        priors = " + priors" if "priors" in self.settings else ""
        return f"{len(self)} prepared crops ({self.encoding}) of {self.settings['source']}{priors}, from {self.store}"

    def __getstate__(self) -> dict:
        # Data workers open their own transaction.
        return {**self.__dict__, "_env": None, "_txn": None, "_pid": None}
