"""Reading and writing images as float32 arrays in [0, 1], keeping 16-bit precision.

OpenCV decodes 16-bit RGB PNG and TIFF exactly (Pillow does not), so it is the reader. Every
image comes out as H x W x 3 RGB: grayscale is repeated over three channels and an alpha channel
is dropped (blur datasets never use transparency).

``as_8bit=True`` decodes as ``cv2.imread(path)`` does with its default flag: a 16-bit file comes out
as 8 bits (for PNG, the high byte of each value). Restormer's single-image DPDD code reads the
16-bit dataset that way, for training and testing, so its numbers are made on 8-bit images.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from deblur_diffusion.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, in sorted (deterministic) order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def read_image_raw(path: str | Path, as_8bit: bool = False) -> np.ndarray:
    """Decodes an image as stored: H x W x 3 in RGB order with its own dtype (uint8 or uint16), or
    with ``as_8bit`` always uint8, converted as OpenCV's default ``imread`` flag converts."""
    path = Path(path)
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ImageReadError(f"cannot read image {path}: {err.strerror or err}") from err
    return decode_image(encoded, str(path), as_8bit)


def decode_image(encoded: np.ndarray, origin: str, as_8bit: bool = False) -> np.ndarray:
    """:func:`read_image_raw` on the bytes of an encoded image (``origin`` names it in errors)."""
    image = cv2.imdecode(encoded, cv2.IMREAD_COLOR if as_8bit else cv2.IMREAD_UNCHANGED) if encoded.size else None
    if image is None:
        raise ImageReadError(f"cannot decode image {origin}: the file is empty, truncated or not an image")
    if image.dtype not in _MAX_VALUE:
        raise ImageReadError(f"unsupported pixel type {image.dtype} in {origin}: expected 8 or 16-bit integers")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels in (1, 2):
        return np.repeat(image[:, :, :1], 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(image[:, :, 2::-1])
    raise ImageReadError(f"unsupported channel count {channels} in {origin}: expected 1 (gray), 3 (RGB) or 4 (RGBA)")


def read_image(path: str | Path, as_8bit: bool = False) -> np.ndarray:
    """Reads an image as float32 H x W x 3 RGB in [0, 1] (8 and 16-bit alike; see ``as_8bit``)."""
    return to_float(read_image_raw(path, as_8bit))


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 or uint16 pixels as a new C-contiguous float32 array in [0, 1]; float input is returned
    as is. Training crops call it on the patch only, so a whole image is never converted."""
    if pixels.dtype == np.float32:
        return pixels
    scaled = pixels.astype(np.float32, order="C")
    return np.divide(scaled, _MAX_VALUE[pixels.dtype], out=scaled)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IHDR chunk comes first: signature (8), length (4), type (4), width (4), height (4), bit depth (1).
_PNG_BIT_DEPTH_OFFSET = 24


def image_bit_depth(path: str | Path) -> int:
    """8 or 16: the bit depth an image is stored with, from its header (never decoded)."""
    path = Path(path)
    with open(path, "rb") as handle:
        header = handle.read(_PNG_BIT_DEPTH_OFFSET + 1)
    if header.startswith(_PNG_SIGNATURE) and len(header) > _PNG_BIT_DEPTH_OFFSET:
        return 16 if header[_PNG_BIT_DEPTH_OFFSET] == 16 else 8
    try:
        with Image.open(path) as image:
            # Pillow has no 16-bit RGB mode: such files open as "RGB" with a raw mode like "RGB;16N".
            decoder_args = image.tile[0][3] if image.tile else image.mode
            raw_mode = decoder_args[0] if isinstance(decoder_args, tuple) else decoder_args
            return 16 if image.mode.startswith("I;16") or ";16" in str(raw_mode) else 8
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError, IndexError):
        return 16 if read_image_raw(path).dtype == np.uint16 else 8


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as err:
        raise ImageReadError(f"image {path} does not exist") from err
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read the header of image {path}: {err}") from err
    return height, width


def to_integer_image(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Rounds a float image in [0, 1] to uint8 or uint16 (values outside [0, 1] are clipped)."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    scale = float(np.iinfo(dtype).max)
    return np.round(np.clip(image, 0.0, 1.0) * scale).astype(dtype)


def quantized(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """A float image as a file of ``bit_depth`` bits holds it (rounded half to even, as
    scikit-image's ``img_as_ubyte`` and NumPy's ``round``), back as float32 in [0, 1]."""
    return to_float(to_integer_image(image, bit_depth))


# EXIF orientation (tag 274) -> how the stored pixels are turned upright, as Pillow's exif_transpose.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
_EXIF_ORIENTATION = 0x0112


def read_photo(path: str | Path) -> tuple[np.ndarray, bytes | None]:
    """A photograph to restore: its pixels as stored (:func:`read_image_raw`), turned upright by its
    EXIF orientation as viewers show it, and its ICC colour profile (None when it has none)."""
    pixels = read_image_raw(path)
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            profile = image.info.get("icc_profile")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        return pixels, None
    if orientation in _UPRIGHT:
        pixels = np.ascontiguousarray(_UPRIGHT[orientation](pixels))
    return pixels, profile or None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


# The PNG signature and IHDR chunk (length, type, 13 bytes, CRC) that an iCCP chunk follows.
_PNG_HEADER_END = 8 + 4 + 4 + 13 + 4
_JPEG_ICC_CHUNK = 65519  # the most profile bytes one APP2 segment holds


def with_icc_profile(encoded: bytes, suffix: str, profile: bytes) -> bytes:
    """An encoded PNG or JPEG with ``profile`` embedded (an iCCP chunk; APP2 ICC_PROFILE segments);
    other formats are returned as they are."""
    if suffix.lower() == ".png":
        chunk = _png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(profile))
        return encoded[:_PNG_HEADER_END] + chunk + encoded[_PNG_HEADER_END:]
    if suffix.lower() in (".jpg", ".jpeg"):
        parts = [profile[i : i + _JPEG_ICC_CHUNK] for i in range(0, len(profile), _JPEG_ICC_CHUNK)]
        segments = b"".join(
            b"\xff\xe2" + (2 + 14 + len(part)).to_bytes(2, "big") + b"ICC_PROFILE\0" + bytes([number, len(parts)]) + part
            for number, part in enumerate(parts, start=1)
        )
        return encoded[:2] + segments + encoded[2:]
    return encoded


def write_image(path: str | Path, image: np.ndarray, bit_depth: int = 8, icc_profile: bytes | None = None) -> Path:
    """Writes a float RGB (H x W x 3) or gray (H x W) image in [0, 1] as an 8 or 16-bit file, with
    ``icc_profile`` embedded when given (PNG and JPEG).

    The file appears whole or not at all: it is encoded under a temporary name beside it and then
    renamed, so a run killed mid-write never leaves a truncated image that a resumed run would skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_integer_image(image, bit_depth)
    if pixels.ndim == 3:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    ok, encoded = cv2.imencode(path.suffix, pixels) if path.suffix else (False, None)
    if not ok:
        raise ImageReadError(f"cannot write image {path}: unsupported extension {path.suffix!r}")
    data = encoded.tobytes() if icc_profile is None else with_icc_profile(encoded.tobytes(), path.suffix, icc_profile)
    try:
        write_atomically(path, data)
    except OSError as err:
        raise ImageReadError(f"cannot write image {path}: {err.strerror or err}") from err
    return path


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` whole or not at all: under a temporary name beside it, then
    renamed over it, so a run killed mid-write leaves the old file (or none), never half of one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
