"""Loading a box-prompted segmenter (SAM, SAM-HQ or SAM 2) from a local transformers folder.

The folder is what ``save_pretrained`` writes (or ``python -m grounding_dino.segment.convert``):
``config.json`` (its ``model_type`` decides the kind), the weights (``model.safetensors`` or
``pytorch_model.bin``) and ``preprocessor_config.json``. Every key of the weights must match the
model: a folder whose weights leave parameters at their random initial values is refused, as
the project's checkpoints are (``grounding_dino.checkpoint``).
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

__all__ = ["SegmenterKind", "SEGMENTER_KINDS", "read_segmenter_kind", "load_segmenter"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class SegmenterKind:
    """
    One family of transformers segmenter.

    Attributes:
        name: config.json's ``model_type``: "sam", "sam_hq" or "sam2".
        classes: returns ``(model class, processor class)`` (imported when first needed).
        decoder_inputs: ``get_image_embeddings(pixel_values)``'s result -> the keyword
            arguments that pass it to the model's ``forward`` (SAM: one tensor; SAM-HQ: the
            embedding and the ViT's intermediate embeddings; SAM 2: the feature pyramid).
        post_process_needs_resized_size: whether the processor's ``post_process_masks``
            takes the resized input size (SAM, SAM-HQ: the image is resized on its longest
            side and padded; SAM 2: resized to a square, no padding).
    """

    name: str
    classes: Callable[[], Tuple[type, type]]
    decoder_inputs: Callable[[object], Dict]
    post_process_needs_resized_size: bool


def _sam_classes():
    from transformers import SamModel, SamProcessor

    return SamModel, SamProcessor


def _sam_hq_classes():
    from transformers import SamHQModel, SamHQProcessor

    return SamHQModel, SamHQProcessor


def _sam2_classes():
    from transformers import Sam2Model, Sam2Processor

    return Sam2Model, Sam2Processor


def _embedding_input(embeddings) -> Dict:
    return {"image_embeddings": embeddings}


def _hq_embedding_inputs(embeddings) -> Dict:
    image_embeddings, intermediate_embeddings = embeddings
    return {
        "image_embeddings": image_embeddings,
        "intermediate_embeddings": intermediate_embeddings,
    }


SEGMENTER_KINDS: Dict[str, SegmenterKind] = {
    "sam": SegmenterKind("sam", _sam_classes, _embedding_input, True),
    "sam_hq": SegmenterKind("sam_hq", _sam_hq_classes, _hq_embedding_inputs, True),
    "sam2": SegmenterKind("sam2", _sam2_classes, _embedding_input, False),
}
"""config.json ``model_type`` -> the segmenter family."""


def read_segmenter_kind(path: str) -> SegmenterKind:
    """
    Checks a segmenter folder and returns its kind from ``config.json``'s ``model_type``.

    Raises:
        FileNotFoundError: the folder, its config.json, its weights or its
            preprocessor_config.json is missing (named).
        ValueError: config.json is not JSON, or its ``model_type`` is not a box-prompted
            segmenter (SAM ``sam``, SAM-HQ ``sam_hq``, SAM 2 ``sam2``).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"The segmenter folder {path} does not exist (expected a transformers folder with "
            f"config.json, model.safetensors and {PROCESSOR_FILE}, e.g. a facebook/sam-vit-base "
            f"download or the output of python -m grounding_dino.segment.convert)"
        )
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} does not exist: {path} is not a transformers model folder"
        )
    try:
        with open(config_file) as stream:
            model_type = json.load(stream).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{config_file} is not a JSON object: {error}") from error
    if model_type not in SEGMENTER_KINDS:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; a mask stage needs a box-prompted "
            f"segmenter: one of {sorted(SEGMENTER_KINDS)} (SAM, SAM-HQ, SAM 2)"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{path} holds no weights: none of {list(WEIGHT_FILES)}")
    if not os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        raise FileNotFoundError(
            f"{os.path.join(path, PROCESSOR_FILE)} does not exist: the segmenter's image "
            f"processor (resize, normalisation, mask post-processing) is read from it"
        )
    return SEGMENTER_KINDS[model_type]


def load_segmenter(path: str):
    """
    Loads the model (eval mode, CPU, float32) and processor of a segmenter folder.

    Returns:
        ``(kind, model, processor)``.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_segmenter_kind`; ValueError also when
            the weights miss keys of the model or hold keys it lacks (both named).
    """
    kind = read_segmenter_kind(path)
    model_class, processor_class = kind.classes()
    model, info = model_class.from_pretrained(path, output_loading_info=True)
    # Keys transformers itself declares optional (tied buffers, SAM 2's video-only modules).
    ignored_missing = list(getattr(model_class, "_keys_to_ignore_on_load_missing", None) or [])
    ignored_unexpected = list(
        getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []
    )
    missing = [k for k in info["missing_keys"] if not _matches(k, ignored_missing)]
    unexpected = [k for k in info["unexpected_keys"] if not _matches(k, ignored_unexpected)]
    mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The weights in {path} do not match its config.json ({kind.name}): "
            f"missing {_listing(missing)}; unexpected {_listing(unexpected)}; "
            f"wrong shape {_listing(mismatched)}"
        )
    processor = processor_class.from_pretrained(path)
    return kind, model.eval(), processor


def _matches(key: str, patterns) -> bool:
    return any(re.search(pattern, key) for pattern in patterns)


def key_names(keys, limit: int) -> str:
    """The first ``limit`` of ``keys`` in sorted order, and how many more there are."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(sorted(keys)[:limit]) + more


def _listing(keys, limit: int = 8) -> str:
    return f"{len(keys)} ({key_names(keys, limit)})" if keys else "none"
