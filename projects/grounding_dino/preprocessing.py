"""Pre-processing shared by every way of running the model: the checks of user inputs (images,
prompts, token spans), the model input of one image, the normalisation, and the prompt runs.

The PyTorch model, :class:`~grounding_dino.GroundingDINOPredictor` and the ONNX Runtime
predictor all go through these functions, so that they see the same inputs.
"""

import ast
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "Prompt",
    "prompt_to_input",
    "check_image",
    "check_token_spans",
    "parse_prompt",
    "parse_token_spans",
    "model_input",
    "prompts_for_images",
    "normalize_image",
    "runs_for_inputs",
]

Prompt = Union[str, Sequence[str]]


def prompt_to_input(prompt: Prompt) -> Dict:
    """A caption (str) or class names (list of str) -> the model's prompt field."""
    if prompt is None:
        raise ValueError("The prompt is None; give a caption or a list of class names")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("The prompt is empty or blank")
        return {"caption": prompt}
    names = list(prompt)
    if not names:
        raise ValueError("The class list is empty")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Class name {index} is empty or not a string: {name!r}")
    return {"category_names": names}


def check_image(image, min_size: int = 32, name: str = "image") -> np.ndarray:
    """
    Validates an HxWx3 uint8 image array.

    Raises:
        ValueError: for None, non-arrays, grayscale, RGBA, float images and images smaller
            than ``min_size`` pixels on a side.
    """
    if image is None:
        raise ValueError(f"{name} is None")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (H, W, 3), got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(f"{name} is grayscale {image.shape}; convert it to 3 channels")
    if image.ndim != 3 or image.shape[2] != 3:
        what = "RGBA" if image.ndim == 3 and image.shape[2] == 4 else "not HxWx3"
        raise ValueError(f"{name} has shape {image.shape} ({what}); expected (H, W, 3)")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {image.dtype}; expected uint8 in [0, 255]")
    if min(image.shape[:2]) < min_size:
        raise ValueError(
            f"{name} is {image.shape[0]}x{image.shape[1]}, smaller than the "
            f"backbone's stride {min_size}"
        )
    return image


def check_token_spans(caption: str, token_spans) -> List[List[List[int]]]:
    """
    Validates official-style token spans: one entry per phrase, each a list of ``[beg, end)``
    character spans in ``caption``, e.g. ``[[[0, 3]], [[4, 8], [10, 12]]]``.

    Returns:
        the spans as lists of ``[int, int]``.

    Raises:
        ValueError: naming the phrase and span that is malformed or outside the caption.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"The caption must be a non-empty string, got {caption!r}")
    if not isinstance(token_spans, (list, tuple)) or not token_spans:
        raise ValueError(f"token spans must be a non-empty list of phrases, got {token_spans!r}")
    result = []
    for index, phrase in enumerate(token_spans):
        if not isinstance(phrase, (list, tuple)) or not phrase:
            raise ValueError(
                f"token spans: phrase {index} must be a non-empty list of "
                f"[beg, end] spans, got {phrase!r}"
            )
        spans = []
        for span in phrase:
            if (
                not isinstance(span, (list, tuple))
                or len(span) != 2
                or not all(isinstance(v, (int, np.integer)) for v in span)
            ):
                raise ValueError(f"token spans: phrase {index}: {span!r} is not [beg, end]")
            beg, end = int(span[0]), int(span[1])
            if not 0 <= beg < end <= len(caption):
                raise ValueError(
                    f"token spans: phrase {index}: span [{beg}, {end}) is empty or "
                    f"outside the caption of {len(caption)} characters"
                )
            spans.append([beg, end])
        result.append(spans)
    return result


def parse_prompt(text: Optional[str], split_commas: bool = True) -> Optional[Prompt]:
    """
    A prompt as a user types it -> a caption or class names: text with commas is a list of
    class names (``"cat, remote control"`` -> ``["cat", "remote control"]``, empty names
    skipped) unless ``split_commas`` is False (a referring expression, or a caption that token
    spans index into); other text stays a caption. None stays None.

    Raises:
        ValueError: the text has commas and no class names.
    """
    if text is None:
        return None
    if not split_commas or "," not in text:
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"The prompt {text!r} holds no class names")
    return names


def parse_token_spans(text: str, caption: str) -> List[List[List[int]]]:
    """
    Token spans typed as a list literal (``"[[[0,3]],[[4,8]]]"``), checked against
    ``caption`` (:func:`check_token_spans`).

    Raises:
        ValueError: the text is not a list literal, or the spans are malformed.
    """
    try:
        spans = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"The token spans {text!r} are not a list literal: {error}") from error
    return check_token_spans(caption, spans)


def model_input(
    image: np.ndarray,
    prompt: Prompt,
    index: int,
    *,
    resize,
    stride: int,
    input_format: str,
    model_input_format: str,
) -> Dict:
    """
    One model input from an image array and a prompt.

    Args:
        image: HxWx3 uint8 array in ``input_format`` ("BGR" or "RGB").
        prompt: a caption or a list of class names.
        index: the image's index (named in errors).
        resize: the test-time resize (``OfficialResize``).
        stride: the backbone's size divisibility (smaller images are refused).
        model_input_format: the channel order the model expects.

    Returns:
        ``{"image": [3, h, w] uint8 tensor (resized), "height": H, "width": W, "caption" or
        "category_names": ...}``.
    """
    image = check_image(image, stride, name=f"image {index}")
    if input_format != model_input_format:
        image = image[:, :, ::-1]
    height, width = image.shape[:2]
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width, **prompt_to_input(prompt)}


def prompts_for_images(
    images: Sequence[np.ndarray], prompts: Union[Prompt, Sequence[Prompt]]
) -> Tuple[List[np.ndarray], List[Prompt]]:
    """
    The images of a batch call and one prompt per image: ``prompts`` is a list with one
    prompt (caption or class list) per image, or a single caption for all images.

    Raises:
        ValueError: the numbers of images and prompts differ.
    """
    images = list(images)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return images, prompts


def normalize_image(
    image: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, input_format: str
) -> torch.Tensor:
    """
    The network's input: a [3, H, W] 0-255 image in ``input_format`` ("RGB"/"BGR") order ->
    float32 RGB (flipped when BGR), then normalised by ``pixel_mean`` and ``pixel_std``
    ([3, 1, 1]), on their device.
    """
    image = image.to(pixel_mean.device, torch.float32)
    if input_format == "BGR":
        image = image.flip(0)
    return (image - pixel_mean) / pixel_std


def runs_for_inputs(prompt_encoder, batched_inputs: Sequence[Dict]) -> List:
    """
    The transformer passes of a batch of model inputs.

    Args:
        prompt_encoder: the model's ``PromptEncoder``.
        batched_inputs: model inputs, each with ``"caption"`` (optionally with
            ``"token_spans"``) or ``"category_names"``.

    Returns:
        the ``PromptRun`` s of all inputs in order (a long prompt gives several, with the
        input's index as ``image_index``).
    """
    return [
        run
        for index, record in enumerate(batched_inputs)
        for run in prompt_encoder.runs_for_input(index, record)
    ]
