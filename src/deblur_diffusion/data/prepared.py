"""A prepared store (:mod:`deblur_diffusion.data.store_writer`) read as a pair source: patches
are copied out of the memory-mapped crops, no image is decoded at training time."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np

from deblur_diffusion.data.io import decode_image
from deblur_diffusion.data.sources import PairPlanes, StoredPairSource
from deblur_diffusion.data.store import LMDB_DIR, MANIFEST, plane_key, read_manifest, settings_difference
from deblur_diffusion.errors import ConfigError, DatasetLayoutError, ImageReadError


class PreparedCrops(StoredPairSource):
    """The crops of a prepared store as a pair source: item ``i`` is crop ``i``.

    Args:
        store: the folder written by ``python -m deblur_diffusion.data.prepare``.
        expected: the settings of the configured training source (:func:`~deblur_diffusion.data.store.source_settings`); a store
            made with other settings is refused, naming the differences. None skips the check (a
            machine that holds the store but not the original dataset).
    """

    def __init__(self, store: str | Path, expected: dict | None = None):
        self.store = Path(store)
        manifest = read_manifest(self.store)
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
                + "\n  ".join(settings_difference(manifest["settings"], expected))
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
        value = self._transaction().get(plane_key(index, plane))
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
