"""Image adapter: RGB pixels at a fixed square size, in raster or patch-scan order (DESIGN.md §3).

Payload layouts for an ``S x S`` image (``3 * S * S`` bytes):

- ``raster``: rows top to bottom, columns left to right, R G B innermost.
- ``patch{k}``: the image is cut into ``k x k`` pixel blocks; blocks go in raster order over the
  block grid, pixels in raster order inside each block, R G B innermost. MEGABYTE found this
  scan better for patch-based models: with patch size ``3*k*k`` each model patch is one block.
"""

from __future__ import annotations

import io
import math
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import IMAGE, Modality, ResourceLimitError, SettingMismatchError, check_limit, positive_limit, register

_PATCH = re.compile(r"patch(\d+)")


def _patch_size(order: str) -> int | None:
    """``"raster"`` -> None, ``"patch{k}"`` -> k; anything else is a ValueError."""
    if order == "raster":
        return None
    m = _PATCH.fullmatch(order)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown image order {order!r}; use 'raster' or 'patch{{k}}', e.g. 'patch4'")
    return int(m.group(1))


def _check_order(order: str, height: int, width: int) -> int | None:
    k = _patch_size(order)
    if k is not None and (height % k or width % k):
        raise ValueError(
            f"order {order!r} needs the image size ({height}x{width}) to be a multiple of {k}; "
            f"pick a patch size that divides the size"
        )
    return k


def to_order(array: np.ndarray, order: str) -> bytes:
    """``[H, W, 3]`` uint8 pixels -> payload bytes in ``order`` (``raster`` or ``patch{k}``)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 array, got {array.shape} {array.dtype}")
    h, w, _ = array.shape
    k = _check_order(order, h, w)
    if k is None:
        return array.tobytes()
    # [H, W, 3] -> [H/k, k, W/k, k, 3] -> [H/k, W/k, k, k, 3]: blocks outermost, pixels inside
    blocks = array.reshape(h // k, k, w // k, k, 3).transpose(0, 2, 1, 3, 4)
    return blocks.tobytes()


def from_order(payload: bytes, size: int, order: str) -> np.ndarray:
    """Inverse of :func:`to_order` for a square ``size x size`` image (3*size*size bytes)."""
    expected = 3 * size * size
    if len(payload) != expected:
        raise ValueError(f"a {size}x{size} RGB payload has {expected} bytes, got {len(payload)}")
    k = _check_order(order, size, size)
    flat = np.frombuffer(payload, dtype=np.uint8)
    if k is None:
        return flat.reshape(size, size, 3).copy()
    n = size // k
    # [n*n*k*k*3] -> [n, n, k, k, 3] -> [n, k, n, k, 3] -> [size, size, 3]
    return flat.reshape(n, n, k, k, 3).transpose(0, 2, 1, 3, 4).reshape(size, size, 3).copy()


def _npy_header(stream, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from the header of a ``.npy`` member, nothing decoded."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream)
    except ValueError as e:
        raise ValueError(f"corrupt .npz batch: bad header of {name!r} ({e})") from None
    raise ValueError(f"corrupt .npz batch: {name!r} has .npy format version {version}, read are 1.0 and 2.0")


def read_npz_batch(source, max_pixels: int | None = None) -> Iterator[tuple[int, np.ndarray, int | None]]:
    """Yield ``(row index, [S, S, 3] uint8 array, label)`` from a downsampled-ImageNet ``.npz``.

    The batch holds ``data`` (N x 3*S*S, channel-planar: the R plane, then G, then B, each S x S
    in raster order) and optionally ``labels`` (1..1000). S is inferred from the row length.
    ``source`` is a path or a binary file object. The arrays' headers are checked first, and an
    image above ``max_pixels`` (S*S) is a `ResourceLimitError` before anything is decompressed;
    then the rows are read one at a time, so memory stays at one image however large the batch
    declares itself. Raises ValueError on anything else.
    """
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        raise ValueError("not a readable .npz batch (expected a zip archive of numpy arrays)") from None
    with archive:
        members = archive.namelist()
        if "data.npy" not in members:
            found = [m.removesuffix(".npy") for m in members]
            raise ValueError(f"no 'data' array in the .npz (found {found})")
        try:
            data = archive.open("data.npy")
            shape, fortran, dtype = _npy_header(data, "data")
            if len(shape) != 2 or dtype != np.uint8 or fortran:
                order = " (Fortran order)" if fortran else ""
                raise ValueError(f"'data' must be an N x 3*S*S uint8 array, got {shape} {dtype}{order}")
            count, row_bytes = shape
            size = math.isqrt(row_bytes // 3)
            if 3 * size * size != row_bytes or not size:
                raise ValueError(f"row length {row_bytes} is not 3*S*S for any image size S")
            check_limit(
                f"a .npz batch of {size}x{size} images ({size * size:,} pixels each)",
                size * size,
                "max_pixels",
                max_pixels,
            )
            labels, label_dtype = None, None
            if "labels.npy" in members:
                labels = archive.open("labels.npy")
                label_shape, _, label_dtype = _npy_header(labels, "labels")
                if label_shape != (count,) or label_dtype.kind not in "iu":
                    raise ValueError(
                        f"{label_shape} {label_dtype} labels for {count} images (want ({count},) integers)"
                    )
            for i in range(count):
                row = data.read(row_bytes)
                if len(row) != row_bytes:
                    raise ValueError(f"corrupt .npz batch: 'data' ends after {i} of its {count} images")
                label = None
                if labels is not None:
                    raw = labels.read(label_dtype.itemsize)
                    if len(raw) != label_dtype.itemsize:
                        raise ValueError(f"corrupt .npz batch: 'labels' ends after {i} of its {count} labels")
                    label = int(np.frombuffer(raw, dtype=label_dtype)[0])
                # planar [3, S, S] -> interleaved [S, S, 3]
                planar = np.frombuffer(row, dtype=np.uint8).reshape(3, size, size)
                yield i, np.ascontiguousarray(planar.transpose(1, 2, 0)), label
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise ValueError(f"corrupt .npz batch: {e}") from None


def _pillow_refusal(reason: Warning | Exception) -> ResourceLimitError:
    """Pillow's decompression-bomb warning or error as our limit skip."""
    return ResourceLimitError(
        f"image refused by Pillow's decompression-bomb check ({reason}); PIL.Image.MAX_IMAGE_PIXELS bounds max_pixels",
        "max_pixels",
    )


@dataclass
class ImageSettings:
    size: int = 64  # side of the square image in pixels (payload is 3*size*size bytes)
    order: str = "raster"  # byte order: "raster", or "patch{k}" (k x k blocks; k divides size)
    # Largest width x height decoded (read from the header first; None: no limit). Pillow's own
    # decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, ~89.5M) applies above it too.
    max_pixels: int | None = 64_000_000

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")
        _check_order(self.order, self.size, self.size)
        positive_limit("max_pixels", self.max_pixels)


@register
class ImageModality(Modality):
    """Any Pillow-readable image -> RGB -> centre crop to a square -> box resize to ``size``."""

    name = "image"
    tag = IMAGE
    extensions = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
    Settings = ImageSettings
    properties = ("size",)

    @property
    def payload_bytes(self) -> int:
        return 3 * self.settings.size**2

    def fit(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> ``[size, size, 3]`` uint8: RGB, centre crop, box resize.

        Alpha is dropped; an image already at ``size x size`` passes through unchanged.
        """
        with warnings.catch_warnings():  # palette-with-transparency notice: alpha is dropped anyway
            warnings.simplefilter("ignore", UserWarning)
            rgb = image.convert("RGB")
        size = self.settings.size
        fitted = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BOX, centering=(0.5, 0.5))
        return np.asarray(fitted, dtype=np.uint8)

    def check_size(self, width: int, height: int) -> None:
        """Raise `ResourceLimitError` for an image above ``max_pixels``."""
        check_limit(
            f"{width}x{height} image ({width * height:,} pixels)",
            width * height,
            "max_pixels",
            self.settings.max_pixels,
        )

    def _open(self, member_bytes: bytes) -> Image.Image:
        """Pillow's lazy open (header only), refusing an image above ``max_pixels`` or Pillow's
        bomb limit (`ResourceLimitError`) and unreadable bytes (ValueError)."""
        try:
            with warnings.catch_warnings(record=True) as caught:  # Pillow's bomb warning refuses too
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(member_bytes))
        except UnidentifiedImageError:  # its message holds the BytesIO repr: say it plainly
            raise ValueError("cannot decode image: not a format Pillow recognises") from None
        except Image.DecompressionBombError as e:
            raise _pillow_refusal(e) from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot decode image ({type(e).__name__}: {e})") from None
        try:
            self.check_size(*im.size)
            bomb = [w.message for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
            if bomb:
                raise _pillow_refusal(bomb[0])
        except ValueError:
            im.close()
            raise
        return im

    def native(self, member_bytes: bytes) -> dict:
        """``{"size": side}`` of a square image, from its header; a non-square image has no
        single size (`SettingMismatchError`: the size must then be set, to crop to it)."""
        with self._open(member_bytes) as im:
            width, height = im.size
        if width != height:
            raise SettingMismatchError(
                f"a {width}x{height} image is not square, so it gives no image size; set the size "
                f"(adapter setting 'size') to centre-crop and resize every image to it",
                "size",
            )
        return {"size": width}

    def conversion(self, member_bytes: bytes) -> tuple[str, str] | None:
        """``("48x40 RGBA", "32x32 RGB")`` for an image that is not ``size x size`` RGB."""
        with self._open(member_bytes) as im:
            (width, height), mode = im.size, im.mode
        size = self.settings.size
        if (width, height, mode) == (size, size, "RGB"):
            return None
        return f"{width}x{height} {mode}", f"{size}x{size} RGB"

    def load(self, member_bytes: bytes) -> np.ndarray:
        """Image file bytes (PNG, JPEG, WebP, ...) -> ``[size, size, 3]`` uint8 pixels.

        The size is checked from the header before any pixel is decoded (``Image.open`` is
        lazy); an image above ``max_pixels`` or Pillow's bomb limit is a `ResourceLimitError`.
        When ``strict``, an image that is not ``size x size`` is a `SettingMismatchError`
        instead of being cropped and resized.
        """
        im = self._open(member_bytes)
        with im:
            size = self.settings.size
            if self.strict and im.size != (size, size):
                width, height = im.size
                raise SettingMismatchError(
                    f"a {width}x{height} image, but the image size is {size} (setting 'size'); images "
                    f"are resized only when the size is given explicitly (adapter_settings)",
                    "size",
                )
            try:
                im = ImageOps.exif_transpose(im)  # camera photos: apply the EXIF rotation
                return self.fit(im)
            except Image.DecompressionBombError as e:
                raise _pillow_refusal(e) from None
            except (OSError, SyntaxError) as e:
                raise ValueError(f"cannot decode image ({type(e).__name__}: {e})") from None

    def encode(self, member_bytes: bytes, meta: dict | None = None) -> bytes:
        return to_order(self.load(member_bytes), self.settings.order)

    def decode(self, payload: bytes) -> Image.Image:
        """Payload -> RGB PIL image.

        A sampled payload may be short or long: missing bytes are filled with zeros (black
        pixels at the end of the scan order), extra bytes are dropped.
        """
        n = self.payload_bytes
        payload = bytes(payload[:n]).ljust(n, b"\0")
        return Image.fromarray(from_order(payload, self.settings.size, self.settings.order))

    def save(self, obj: Image.Image, path) -> None:
        obj.save(Path(path), format="PNG")
