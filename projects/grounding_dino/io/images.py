"""Reading images and videos: an image file as a BGR array (as detectron2's datasets read it), a
video's frames, and the DataLoader whose worker processes decode images while the model runs."""

from typing import Dict, Iterator, List, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data.detection_utils import read_image
from torch.utils.data import DataLoader, Dataset

__all__ = ["read_bgr", "video_info", "video_frames", "ImageFiles", "build_image_loader"]


def read_bgr(path: str) -> np.ndarray:
    """
    Reads an image file as HxWx3 uint8 BGR, its EXIF orientation applied (as detectron2's
    dataset loading reads it, so the sizes match).

    Raises:
        ValueError: naming the file, when it cannot be read or decoded.
    """
    try:
        image = read_image(path, format="BGR")
    except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for bad files
        raise ValueError(f"{path}: cannot read the image ({error})") from error
    return np.ascontiguousarray(image)


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
    cannot be read gives ``{"path", "file_name", "error"}`` instead of raising, so one bad
    file never stops the loader.
    """

    def __init__(self, items: Sequence[Tuple[str, str]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict:
        path, file_name = self.items[index]
        try:
            return {"path": path, "file_name": file_name, "image": read_bgr(path)}
        except ValueError as error:
            return {"path": path, "file_name": file_name, "error": str(error)}


def _as_list(batch: List[Dict]) -> List[Dict]:
    return batch


def build_image_loader(
    items: Sequence[Tuple[str, str]], *, batch_size: int, num_workers: int
) -> DataLoader:
    """
    Batches of decoded images in the order of ``items``.

    Args:
        items: ``(path, file_name)`` pairs.
        batch_size: images per batch (the model's batch).
        num_workers: decoding processes (0: decode in this process).
    """
    return DataLoader(
        ImageFiles(items),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
        prefetch_factor=2 if num_workers else None,
    )
