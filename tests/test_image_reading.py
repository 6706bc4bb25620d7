"""The one image reader (``grounding_dino.io.images.read_image_file``) through every entry point
that reads image files: ``read_bgr`` (the demo CLI, the web demo), the labeller's DataLoader
dataset (``ImageFiles``) and the training/evaluation mapper (``GroundingDatasetMapper``).

Every kind of file users have is built here: it either gives the pixels an independent decoder
(OpenCV, or detectron2's ``read_image``) gives, upright, or an ``ImageReadError`` (a
``ValueError``) whose message names the file and the reason, the same everywhere.
"""

import struct
import zlib

import cv2
import numpy as np
import pytest
from detectron2.data.detection_utils import read_image as d2_read_image
from PIL import Image

from grounding_dino.data.mapper import GroundingDatasetMapper
from grounding_dino.io.images import (
    DEFAULT_MAX_PIXELS,
    ImageFiles,
    ImageReadError,
    check_image_file,
    read_bgr,
)

MIN_SIZE = 32  # what the labeller and the web demo pass: the backbone's stride
H, W = 40, 64


def _pixels(seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = rng.integers(0, 255, 3)  # two flat halves: JPEG-friendly, asymmetric
    image[:, W // 2 :] = rng.integers(0, 255, 3)
    image[: H // 4, : W // 4] = 255
    return image


def _png_of_zeros(path, width, height):
    """A real grayscale PNG of ``width x height`` zero pixels, compressed ~1000:1 (a
    decompression bomb: a few hundred KB on disk)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body))
        f.write(chunk(b"IEND", b""))


# Each builder writes the file and returns the expected BGR array, or the expected reason.
def _jpeg(path):
    Image.fromarray(_pixels()).save(path, quality=95)
    return d2_read_image(str(path), format="BGR")


def _exif_rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": what phones write
    Image.fromarray(_pixels()).save(path, quality=95, exif=exif)
    with Image.open(path) as stored:
        raw = np.asarray(stored.convert("RGB"))  # as stored: H x W
    return np.ascontiguousarray(np.rot90(raw, k=-1)[:, :, ::-1])  # upright: W x H


def _cmyk_jpeg(path):
    Image.fromarray(_pixels()).convert("CMYK").save(path, quality=95)
    return d2_read_image(str(path), format="BGR")


def _png_16bit_gray(path):
    values = np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16)
    cv2.imwrite(str(path), values)
    gray = np.rint(cv2.imread(str(path), cv2.IMREAD_UNCHANGED) / 257.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _png_16bit_color(path):
    values = np.random.default_rng(2).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    cv2.imwrite(str(path), values)
    return (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) >> 8).astype(np.uint8)


def _gray_png(path):
    Image.fromarray(_pixels()).convert("L").save(path)
    return cv2.imread(str(path))


def _palette_png(path):
    Image.fromarray(_pixels()).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    return cv2.imread(str(path))


def _palette_transparent_png(path):
    image = Image.fromarray(_pixels()).convert("P", palette=Image.Palette.ADAPTIVE)
    image.save(path, transparency=0)
    return cv2.imread(str(path))  # OpenCV drops the transparency too


def _rgba_png(path):
    rgba = np.dstack([_pixels(), np.full((H, W), 7, np.uint8)])
    Image.fromarray(rgba).save(path)
    return cv2.imread(str(path))


def _animated_gif(path):
    red, blue = Image.new("RGB", (W, H), (255, 0, 0)), Image.new("RGB", (W, H), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    return np.full((H, W, 3), (0, 0, 255), np.uint8)  # the first frame, red, in BGR


def _webp(path):
    Image.fromarray(_pixels()).save(path, lossless=True)
    return cv2.imread(str(path))


def _truncated_jpeg(path):
    Image.fromarray(_pixels(3)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated"


def _truncated_png(path):
    cv2.imwrite(str(path), np.random.default_rng(4).integers(0, 255, (H, W, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated"


def _empty(path):
    path.write_bytes(b"")
    return "the file is empty (0 bytes)"


def _text_named_jpg(path):
    path.write_text("not an image, only named like one\n")
    return "not an image"


def _decompression_bomb(path):
    _png_of_zeros(path, 14000, 14000)  # 196 megapixels
    return "decompression bomb"


def _over_the_limit(path):
    side = int(DEFAULT_MAX_PIXELS**0.5) + 1  # 10001 x 10001
    _png_of_zeros(path, side, side)
    return f"{side}x{side} = {side * side:,} pixels, more than the limit of 100,000,000"


def _under_the_minimum(path):
    cv2.imwrite(str(path), np.zeros((MIN_SIZE - 1, 100, 3), np.uint8))
    return f"100x{MIN_SIZE - 1} pixels, smaller than {MIN_SIZE} pixels on a side"


CASES = {
    "photo.jpg": _jpeg,
    "exif_rotated.jpg": _exif_rotated_jpeg,
    "cmyk.jpg": _cmyk_jpeg,
    "gray_16bit.png": _png_16bit_gray,
    "color_16bit.png": _png_16bit_color,
    "gray.png": _gray_png,
    "palette.png": _palette_png,
    "palette_transparent.png": _palette_transparent_png,
    "rgba.png": _rgba_png,
    "animated.gif": _animated_gif,
    "lossless.webp": _webp,
    "truncated.jpg": _truncated_jpeg,
    "truncated.png": _truncated_png,
    "empty.jpg": _empty,
    "text.jpg": _text_named_jpg,
    "bomb.png": _decompression_bomb,
    "over_the_limit.png": _over_the_limit,
    "under_the_minimum.png": _under_the_minimum,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return {name: (str(folder / name), build(folder / name)) for name, build in CASES.items()}


@pytest.fixture(scope="module")
def mapper(minilm_dir):
    return GroundingDatasetMapper(
        False,
        augmentations=[],
        tokenizer=minilm_dir,
        thing_classes=["thing"],
        image_format="BGR",
        drop_warning_period=1000,
    )


def _through_read_bgr(path, mapper):
    return read_bgr(path, min_size=MIN_SIZE)


def _through_the_labellers_loader(path, mapper):
    item = ImageFiles([(path, "name")], min_size=MIN_SIZE)[0]
    if "error" in item:
        raise ImageReadError(path, item["error"].split(": cannot read the image: ", 1)[1])
    return item["image"]


def _through_the_mapper(path, mapper):
    # training and evaluation resize every image, so the mapper sets no minimum side
    return mapper({"file_name": path, "image_id": 1})["image"].numpy().transpose(1, 2, 0)


ENTRY_POINTS = {
    "read_bgr": _through_read_bgr,
    "label_loader": _through_the_labellers_loader,
    "mapper": _through_the_mapper,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name", list(CASES))
def test_every_kind_of_file_through_every_entry_point(files, mapper, name, entry):
    path, expected = files[name]
    if entry == "mapper" and name == "under_the_minimum.png":
        expected = cv2.imread(path)
    if isinstance(expected, str):
        with pytest.raises(ImageReadError) as caught:
            ENTRY_POINTS[entry](path, mapper)
        message = str(caught.value)
        assert message.startswith(f"{path}: cannot read the image: "), message
        assert expected.lower() in message.lower(), message
        return
    image = ENTRY_POINTS[entry](path, mapper)
    assert image.dtype == np.uint8 and image.shape == expected.shape
    tolerance = 1 if name == "color_16bit.png" else 0  # Pillow keeps the high byte of 16 bits
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= tolerance


def test_limits_are_checked_before_decoding(files, monkeypatch):
    """The size checks read the header only: no pixel is decoded for a refused file."""
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    for name in ("bomb.png", "over_the_limit.png", "under_the_minimum.png"):
        path, reason = files[name]
        with pytest.raises(ImageReadError, match=reason.split(" (")[0][:20]):
            read_bgr(path, min_size=MIN_SIZE)
    assert not decoded
    width, height = check_image_file(files["exif_rotated.jpg"][0])
    assert (width, height) == (W, H)  # as stored; read_bgr gives it upright (H and W swapped)
    assert not decoded
