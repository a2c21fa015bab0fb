"""Weights given by URL (``ckpt=https://...``): downloaded once into a cache folder, resumed after a
cut, and checked by SHA-256.

The cache is ``$DEBLUR_DIFFUSION_CACHE`` when set, else torch.hub's checkpoint folder
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), with one subfolder
per URL (two releases may both call their file ``net_g.pth``). A download goes to
``<file>.partial`` first and only takes the file's name once complete; a later run asks the server
for the rest of a ``.partial`` file (an HTTP range request) instead of starting again.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from deblur_diffusion.errors import DeblurError

CACHE_ENV = "DEBLUR_DIFFUSION_CACHE"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


class DownloadError(DeblurError):
    """Weights could not be downloaded, or are not the ones asked for (SHA-256)."""


def is_url(value) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(torch.hub.get_dir()) / "checkpoints")


def cached_path(url: str) -> Path:
    """Where the file of ``url`` is kept: ``<cache>/<12 hex digits of the URL>/<its file name>``."""
    name = Path(urlparse(url).path).name or "download"
    return cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:12] / name


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, or of every file of a folder (an export folder) with its name."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, console: Console) -> None:
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DownloadError(
            f"cannot download {url} ({reason}); without a network, fetch it elsewhere and put it at {target}, or give ckpt=<the local file>"
        ) from error
    with response:
        resumed = offset > 0 and response.status == 206  # a server that ignores the range sends it all
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        try:
            with open(partial, "ab" if resumed else "wb") as handle, Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{'resuming' if resumed else 'downloading'} {target.name}", total=total, completed=offset)
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    handle.write(chunk)
                    progress.advance(task, len(chunk))
        except (urllib.error.URLError, OSError) as error:
            raise DownloadError(f"the download of {url} stopped ({error}); run again to resume it from {partial}") from error
    if total is not None and partial.stat().st_size != total:
        raise DownloadError(f"the download of {url} stopped at {partial.stat().st_size} of {total} bytes; run again to resume it")
    os.replace(partial, target)


def fetch_weights(url: str, sha256: str | None = None, console: Console | None = None) -> Path:
    """The local copy of ``url``, downloaded on first use (with a progress bar); its SHA-256 is
    printed and, given ``sha256``, must match (a mismatch is refused and the file left for a look)."""
    console = console or Console(stderr=True)
    target = cached_path(url)
    if not target.is_file():
        _download(url, target, console)
    digest = file_sha256(target)
    if sha256 is not None and digest != str(sha256).lower():
        raise DownloadError(f"{target} (from {url}) has SHA-256 {digest}, not the expected {sha256}; delete it to download it again")
    console.print(f"{url}: {target} (SHA-256 {digest})", highlight=False, soft_wrap=True)
    return target


def local_weights(weights, sha256: str | None = None):
    """``weights`` (a path, a URL, or a mapping of parts to either) with every URL replaced by its
    downloaded file; ``sha256`` checks a single file (local or downloaded)."""
    if isinstance(weights, dict):
        if sha256 is not None:
            raise DownloadError(
                f"ckpt_sha256= checks one file, but ckpt= names {len(weights)} ({', '.join(weights)}): "
                "check each part's digest with sha256sum instead"
            )
        return {part: local_weights(file) for part, file in weights.items()}
    if is_url(weights):
        return fetch_weights(weights, sha256)
    if sha256 is not None:
        path = Path(weights)
        if not path.exists():  # a file, or an export folder (hashed file by file)
            raise DownloadError(f"checkpoint not found: {path}")
        digest = file_sha256(path)
        if digest != str(sha256).lower():
            raise DownloadError(f"{path} has SHA-256 {digest}, not the expected {sha256}")
    return weights
