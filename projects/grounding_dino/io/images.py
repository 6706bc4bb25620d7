"""
Reading images and videos: the one function that turns an image file into an array for every
entry point (the labeller, the demo CLI, the web demo, the dataset mapper), a video's frames,
and the DataLoader whose worker processes decode images while the model runs.

:func:`read_image_file` checks the size from the file's header before decoding anything
(``max_pixels``, ``min_size``), then decodes the first frame, applies the EXIF orientation
(sizes and boxes are in the upright frame) and converts every mode to 8-bit RGB or BGR:

==========================================  ==============================================
input                                       result
==========================================  ==============================================
RGB / grayscale / palette / CMYK            3 channels, 8 bits (CMYK through Pillow)
RGBA, LA, palette with transparency         the colour channels; alpha is dropped (as
                                            detectron2's ``read_image`` and OpenCV do)
16-bit PNG                                  scaled to 8 bits (``value / 257``)
animated GIF / WebP / multi-page TIFF       the first frame
EXIF orientation 2..8 (phones' JPEGs)       rotated/flipped upright
empty file, not an image, unsupported       :class:`ImageReadError` naming the file and
format, truncated file, more pixels than    the reason
``max_pixels`` (decompression bombs), a
side shorter than ``min_size``
==========================================  ==============================================
"""

import os
import warnings
from typing import Dict, Iterator, List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .processes import die_with_parent, forget_fds

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "ImageReadError",
    "check_image_file",
    "read_image_file",
    "read_bgr",
    "video_info",
    "video_frames",
    "ImageFiles",
    "build_image_loader",
]

# 100 megapixels: a 10000x10000 photo (300 MB as a decoded BGR array). Pillow's own
# decompression-bomb guard stops at twice its MAX_IMAGE_PIXELS (179 megapixels by default).
DEFAULT_MAX_PIXELS = 100_000_000

# The formats opened (JPEG includes phones' multi-picture MPO files); Pillow would otherwise
# also try EPS (through Ghostscript), PSD, ICO and dozens more on any file.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")


class ImageReadError(ValueError):
    """An image file that cannot be used. ``str(error)`` is ``"<path>: cannot read the image:
    <reason>"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot read the image: {reason}")
        self.path = path
        self.reason = reason


def _open(path: str) -> Image.Image:
    """Opens ``path`` with Pillow, reading the header only."""
    if not os.path.isfile(path):
        raise ImageReadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # the size is checked against max_pixels below, with a message that says so
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            path, f"too many pixels to decode, a decompression bomb? (Pillow: {error})"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(
            path, f"not an image, or not one of the formats read ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except Exception as error:  # anything Pillow raises on a malformed header
        raise ImageReadError(path, f"cannot be opened as an image ({error})") from None


def _check_size(path: str, width: int, height: int, max_pixels: int, min_size: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            path,
            f"{width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,}; downscale it (the model resizes it anyway)",
        )
    if min(width, height) < min_size:
        raise ImageReadError(
            path,
            f"{width}x{height} pixels, smaller than {min_size} pixels on a side (the "
            "backbone's stride)",
        )


def check_image_file(
    path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1
) -> Tuple[int, int]:
    """
    Checks an image file from its header, decoding no pixels.

    Args:
        path: the file.
        max_pixels: more pixels (width x height) are refused.
        min_size: a shorter side is refused (the backbone's stride).

    Returns:
        (width, height) as stored (before the EXIF orientation, which changes neither the
        pixel count nor the shorter side).

    Raises:
        ImageReadError: naming the file and the reason.
    """
    with _open(path) as image:
        width, height = image.size
    _check_size(path, width, height, max_pixels, min_size)
    return width, height


def _as_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit grayscale (PNG) arrives as I;16 or I: scale its range to 8 bits; Pillow's
        # own convert("RGB") would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        values = np.clip(values, 0, 65535) / 257.0 if image.mode != "F" else values
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    with warnings.catch_warnings():
        # "Palette images with Transparency ... should be converted to RGBA": alpha is dropped
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(image.convert("RGB"))


def read_image_file(
    path: str,
    format: str = "BGR",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
) -> np.ndarray:
    """
    Reads an image file as an HxWx3 uint8 array in the upright frame (the module doc lists
    what each kind of file gives).

    Args:
        path: the file.
        format: "BGR" (OpenCV's and the predictor's order) or "RGB".
        max_pixels: more pixels (width x height, from the header) are refused before any
            pixel is decoded.
        min_size: a shorter side is refused.

    Returns:
        HxWx3 uint8, H and W after the EXIF orientation.

    Raises:
        ImageReadError: naming the file and the reason.
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format {format!r}: 'BGR' or 'RGB'")
    with _open(path) as image:
        _check_size(path, *image.size, max_pixels, min_size)
        try:
            image.seek(0)  # animated GIF / WebP, multi-page TIFF: the first frame
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = _as_rgb_array(upright)
        except Exception as error:  # truncated or corrupt data, a broken EXIF block...
            raise ImageReadError(
                path, f"cannot be decoded ({type(error).__name__}: {error})"
            ) from None
    if format == "BGR":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def read_bgr(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> np.ndarray:
    """
    Reads an image file as HxWx3 uint8 BGR: :func:`read_image_file` with ``format="BGR"``.

    Raises:
        ImageReadError (a ``ValueError``): naming the file and the reason.
    """
    return read_image_file(path, "BGR", max_pixels=max_pixels, min_size=min_size)


def _open_video(path: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"{path}: cannot open the video")
    return capture


def video_info(path: str) -> Tuple[float, int]:
    """
    Returns:
        (frames per second, 25 when the file does not say; the number of frames the file
        declares, 0 when it does not say).

    Raises:
        ValueError: naming the file, when it cannot be opened.
    """
    capture = _open_video(path)
    try:
        return capture.get(cv2.CAP_PROP_FPS) or 25.0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()


def video_frames(path: str) -> Iterator[np.ndarray]:
    """The frames of a video file as HxWx3 uint8 BGR arrays, until one cannot be read.

    Raises:
        ValueError: naming the file, when it cannot be opened.
    """
    capture = _open_video(path)
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield frame
    finally:
        capture.release()


class ImageFiles(Dataset):
    """
    ``(path, file_name)`` pairs -> ``{"path", "file_name", "image"}`` dicts; an image that
    cannot be read gives ``{"path", "file_name", "error"}`` instead of raising (any
    ``Exception``: a Pillow or NumPy error the reader did not foresee, ``MemoryError``), so
    one bad file never stops the loader.

    Args:
        items: ``(path, file_name)`` pairs.
        max_pixels, min_size: the limits of :func:`read_image_file`.
    """

    def __init__(
        self,
        items: Sequence[Tuple[str, str]],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = 1,
    ):
        self.items = list(items)
        self.max_pixels = max_pixels
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict:
        path, file_name = self.items[index]
        try:
            image = read_bgr(path, max_pixels=self.max_pixels, min_size=self.min_size)
        except ImageReadError as error:
            return {"path": path, "file_name": file_name, "error": str(error)}
        except Exception as error:
            reason = f"{path}: cannot be read ({type(error).__name__}: {error})"
            return {"path": path, "file_name": file_name, "error": reason}
        return {"path": path, "file_name": file_name, "image": image}


def _as_list(batch: List[Dict]) -> List[Dict]:
    return batch


class _DecoderInit:
    """The decoding processes' start: die with the process that forked them, and close the
    descriptors they must not hold (a part file's lock)."""

    def __init__(self, parent_pid: int, private_fds: Sequence[int]):
        self.parent_pid = parent_pid
        self.private_fds = tuple(private_fds)

    def __call__(self, worker_id: int) -> None:
        forget_fds(self.private_fds)
        die_with_parent(self.parent_pid)


def build_image_loader(
    items: Sequence[Tuple[str, str]],
    *,
    batch_size: int,
    num_workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
    private_fds: Sequence[int] = (),
) -> DataLoader:
    """
    Batches of decoded images in the order of ``items``. The decoding processes die with
    this process (also on ``kill -9``) and close ``private_fds``.

    Args:
        items: ``(path, file_name)`` pairs.
        batch_size: images per batch (the model's batch).
        num_workers: decoding processes (0: decode in this process).
        max_pixels, min_size: the limits of :func:`read_image_file`.
        private_fds: descriptors of this process (an ``flock``-ed file) that the decoding
            processes, forked from it, close at once, so that the lock ends with this process.
    """
    return DataLoader(
        ImageFiles(items, max_pixels=max_pixels, min_size=min_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=_DecoderInit(os.getpid(), private_fds) if num_workers else None,
    )
