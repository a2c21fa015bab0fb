"""Reading and writing images as float32 arrays in [0, 1], keeping 16-bit precision.

OpenCV decodes 16-bit RGB PNG and TIFF exactly (Pillow does not), so it is the reader. Every
image comes out as H x W x 3 RGB: grayscale is repeated over three channels and an alpha channel
is dropped (blur datasets never use transparency).

``as_8bit=True`` decodes as ``cv2.imread(path)`` does with its default flag: a 16-bit file comes out
as 8 bits (for PNG, the high byte of each value). Restormer's single-image DPDD code reads the
16-bit dataset that way, for training and testing, so its numbers are made on 8-bit images.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from deblur_diffusion.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Photo formats people have that the reader cannot decode, and what to do with them.
_CONVERT = "convert it to JPEG or PNG first"
_DEVELOP = "develop it to a 16-bit PNG or TIFF first"
UNSUPPORTED_PHOTO_FORMATS = {
    ".heic": f"HEIC is not supported: {_CONVERT}",
    ".heif": f"HEIF is not supported: {_CONVERT}",
    ".avif": f"AVIF is not supported: {_CONVERT}",
    ".jxl": f"JPEG XL is not supported: {_CONVERT}",
    ".gif": f"GIF is not supported: {_CONVERT}",
    **{
        raw: f"a camera RAW file ({raw[1:].upper()}) is not supported: {_DEVELOP}"
        for raw in (".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")
    },
}

_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def unsupported_reason(path: Path) -> str | None:
    """Why a photo of a known but unreadable format is passed over (None for other files)."""
    return UNSUPPORTED_PHOTO_FORMATS.get(path.suffix.lower())


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
_EXIF_HEADER = b"Exif\0\0"
# The quality restored JPEGs are written with (Pillow's scale, 1-100); chroma is kept at full
# resolution (4:4:4): a restoration's point is its detail.
JPEG_QUALITY = 95


@dataclass(frozen=True)
class PhotoMetadata:
    """What a photo carries besides its pixels, written back with its restoration: the ICC colour
    profile and the EXIF block (camera, lens, date, GPS...) with its orientation reset to 1, as
    the pixels are stored upright once read."""

    icc_profile: bytes | None = None
    exif: bytes | None = None


def read_photo(path: str | Path) -> tuple[np.ndarray, PhotoMetadata]:
    """A photograph to restore: its pixels as stored (:func:`read_image_raw`), turned upright by its
    EXIF orientation as viewers show it, and its metadata. Every entry point that reads a user's
    photo (``predict``, ``generate_prior input=``, the app) reads it here, so that they all see the
    same upright pixels."""
    pixels = read_image_raw(path)
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            orientation = exif.get(_EXIF_ORIENTATION, 1)
            profile = image.info.get("icc_profile") or None
            if orientation != 1 and _EXIF_ORIENTATION in exif:
                exif[_EXIF_ORIENTATION] = 1
            exif_bytes = exif.tobytes() if len(exif) else None
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        return pixels, PhotoMetadata()
    if orientation in _UPRIGHT:
        pixels = np.ascontiguousarray(_UPRIGHT[orientation](pixels))
    return pixels, PhotoMetadata(profile, exif_bytes)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


# The PNG signature and IHDR chunk (length, type, 13 bytes, CRC) that ancillary chunks follow.
_PNG_HEADER_END = 8 + 4 + 4 + 13 + 4


def _png_with_metadata(encoded: bytes, metadata: PhotoMetadata) -> bytes:
    """An encoded PNG with an iCCP chunk (the profile) and an eXIf chunk (PNG 1.5: the EXIF block
    without its JPEG header) after its header, both before the image data as the standard asks."""
    chunks = b""
    if metadata.icc_profile:
        chunks += _png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(metadata.icc_profile))
    if metadata.exif:
        chunks += _png_chunk(b"eXIf", metadata.exif.removeprefix(_EXIF_HEADER))
    return encoded[:_PNG_HEADER_END] + chunks + encoded[_PNG_HEADER_END:]


def write_image(
    path: str | Path, image: np.ndarray, bit_depth: int = 8, metadata: PhotoMetadata | None = None, jpeg_quality: int = JPEG_QUALITY
) -> Path:
    """Writes a float RGB (H x W x 3) or gray (H x W) image in [0, 1] as an 8 or 16-bit file.

    ``metadata`` (a photo's ICC profile and EXIF) goes into PNG (iCCP, eXIf), JPEG (APP1 EXIF and
    APP2 ICC after the JFIF APP0, through Pillow) and lossless WebP (through Pillow) files, and the
    profile into TIFF files (through tifffile; a TIFF's own tags are its layout, not a camera's
    EXIF); BMP keeps pixels only. JPEGs are written at ``jpeg_quality`` with full-resolution chroma.

    The file appears whole or not at all: it is encoded under a temporary name beside it and then
    renamed, so a run killed mid-write never leaves a truncated image that a resumed run would skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = metadata or PhotoMetadata()
    pixels = to_integer_image(image, bit_depth)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1-100, got {jpeg_quality}")
        encoded = io.BytesIO()
        extra = {"icc_profile": metadata.icc_profile} if metadata.icc_profile else {}
        if metadata.exif:
            extra["exif"] = metadata.exif
        # JPEG holds 8 bits whatever was asked.
        Image.fromarray(to_integer_image(image, 8)).save(encoded, "JPEG", quality=jpeg_quality, subsampling=0, **extra)
        data = encoded.getvalue()
    elif suffix == ".webp" and (metadata.icc_profile or metadata.exif):
        encoded = io.BytesIO()
        extra = {"icc_profile": metadata.icc_profile} if metadata.icc_profile else {}
        if metadata.exif:
            extra["exif"] = metadata.exif
        # Lossless, as OpenCV writes WebP without metadata; WebP holds 8 bits.
        Image.fromarray(to_integer_image(image, 8)).save(encoded, "WEBP", lossless=True, exact=True, **extra)
        data = encoded.getvalue()
    elif suffix in (".tif", ".tiff") and metadata.icc_profile:
        import tifffile

        encoded = io.BytesIO()
        photometric = "rgb" if pixels.ndim == 3 else "minisblack"
        tifffile.imwrite(encoded, pixels, photometric=photometric, compression="zlib", iccprofile=metadata.icc_profile)
        data = encoded.getvalue()
    else:
        if pixels.ndim == 3:
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        ok, encoded = cv2.imencode(path.suffix, pixels) if path.suffix else (False, None)
        if not ok:
            raise ImageReadError(f"cannot write image {path}: unsupported extension {path.suffix!r}")
        data = _png_with_metadata(encoded.tobytes(), metadata) if suffix == ".png" else encoded.tobytes()
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
