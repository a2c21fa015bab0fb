"""The layout of a prepared store, shared by its writer and its reader.

A store folder holds ``crops.lmdb/`` (an LMDB environment whose values ``<crop>.<plane>`` are the
crops' planes: input views, prior, target, as stored, uint8 or uint16, raw or PNG-encoded) and
``manifest.json`` (the settings it was made with, the source files, the crop rule and one record
per crop). A store is only used with the settings it was made with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from deblur_diffusion.data.crops import CropRule
from deblur_diffusion.data.io import write_atomically
from deblur_diffusion.data.sources import PairSource
from deblur_diffusion.errors import DatasetLayoutError

STORE_FORMAT = "deblur-diffusion prepared crops"
STORE_VERSION = 1
MANIFEST = "manifest.json"
LMDB_DIR = "crops.lmdb"


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


def settings_difference(made_with: dict, requested: dict) -> list[str]:
    return [
        f"{key}: store {made_with.get(key)!r}, requested {requested.get(key)!r}"
        for key in sorted(set(made_with) | set(requested))
        if made_with.get(key) != requested.get(key)
    ]


def plane_key(crop: int, plane: int) -> bytes:
    return f"{crop:09d}.{plane}".encode()


def read_manifest(store: Path) -> dict | None:
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


def write_manifest(store: Path, manifest: dict) -> None:
    write_atomically(store / MANIFEST, json.dumps(manifest, indent=1))
