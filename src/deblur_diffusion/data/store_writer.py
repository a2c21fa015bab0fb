"""Writes the official training crops of a pair source into a store (``python -m
deblur_diffusion.data.prepare``), once, so that training reads patches instead of decoding images.

Every plane of a pair (input views, prior, target) is written as stored (uint8 or uint16) into an
LMDB environment (layout: :mod:`deblur_diffusion.data.store`); reading a patch then maps the crop's
pages and copies only the patch (:class:`~deblur_diffusion.data.prepared.PreparedCrops`).

LMDB because the measurement in ``benchmarks/data_throughput.py`` favours it (see
``benchmarks/README.md``): with raw pixels it reads patches at the rate of a memory-mapped array,
in one file, with concurrent readers in every data worker; PNG-encoded values (``encoding=png``,
BasicSR's way) take a half to three quarters of the space but decode a whole crop per patch.

A store is written pair by pair; an interrupted run resumes after the last complete pair, and a run
with other settings is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import lmdb
import numpy as np

from deblur_diffusion.data.crops import CropRule
from deblur_diffusion.data.sources import PairPlanes, PairSource
from deblur_diffusion.data.store import (
    LMDB_DIR,
    STORE_FORMAT,
    STORE_VERSION,
    plane_key,
    read_manifest,
    settings_difference,
    source_settings,
    write_manifest,
)
from deblur_diffusion.errors import ConfigError, ImageReadError

ENCODINGS = ("raw", "png")
# LMDB maps its file at a fixed size, reserving that much address space (not disk): the writer
# starts at 1 GiB and doubles when a pair does not fit, so no terabyte map meets a cluster's
# `ulimit -v`. Readers map the size the file records.
INITIAL_MAP_SIZE = 1 << 30
_PAIRS_DONE_KEY = b"__pairs_done__"


def _encode(pixels: np.ndarray, encoding: str) -> bytes:
    pixels = np.ascontiguousarray(pixels)
    if encoding == "raw":
        return pixels.tobytes()
    ok, encoded = cv2.imencode(".png", pixels[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ImageReadError(f"cannot encode a {pixels.dtype} crop as PNG")
    return encoded.tobytes()


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
    manifest = read_manifest(store)
    if manifest is not None and (manifest["settings"], manifest["encoding"]) != (settings, encoding):
        if not overwrite:
            raise ConfigError(
                f"prepared store {store} was made with other settings:\n  "
                + "\n  ".join(
                    settings_difference({**manifest["settings"], "encoding": manifest["encoding"]}, {**settings, "encoding": encoding})
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
        write_manifest(store, manifest)
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
                write_manifest(store, manifest)
    finally:
        env.close()
    manifest["crops"] = records
    manifest["complete"] = True
    write_manifest(store, manifest)
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
                txn.put(plane_key(index, plane_index), _encode(plane, encoding))
            # Named as the official scripts name their crop files: <image>-<n>, n from 1.
            records.append([f"{source.name(pair)}-{len(records) + 1}", pair, top, left, *crop.target.shape[:2]])
        txn.put(f"record.{pair:09d}".encode(), json.dumps(records).encode())
        txn.put(_PAIRS_DONE_KEY, str(pair + 1).encode())
    return records
