"""The ONNX graph of Grounding DINO: the network between preprocessing and post-processing.

Inputs (one image, R prompt runs of L tokens; see docs/interfaces.md):

* ``image`` [1, 3, H, W] float32, the normalised RGB image (``normalize_image``), any size;
* ``input_ids`` [R, L] int64, ``token_mask`` [R, L] bool, ``self_attention_mask`` [R, L, L]
  bool, ``position_ids`` [R, L] int64: ``PromptEncoder.batch`` of the image's runs
  (``token_type_ids`` are zeros and made in the graph), 1 <= L <= max_text_len.

Outputs: ``logits`` [R, Q, max_text_len] float32 token logits (-inf past each caption) and
``boxes`` [R, Q, 4] float32 sigmoid (cx, cy, w, h) normalised by the image size, of all Q
queries. Tokenising, resizing, chunking and post-processing stay in Python.
"""

import contextlib
import logging
import os
import time
import warnings
from typing import Iterator, Tuple

import torch
from torch import nn

from ..modeling.deformable_attention import deformable_kernel
from ..modeling.switches import switched, tracing_mode
from ..text.structures import TokenizedText
from .shapes import with_level_layout

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "DEFAULT_OPSET",
    "GroundingDINOGraph",
    "export_mode",
    "export_onnx",
    "write_metadata",
    "read_metadata",
]

logger = logging.getLogger(__name__)

_METADATA_PREFIX = "grounding_dino."
INPUT_NAMES = ("image", "input_ids", "token_mask", "self_attention_mask", "position_ids")
OUTPUT_NAMES = ("logits", "boxes")
# 17: LayerNormalization is one op from opset 17 on, which ONNX Runtime runs as its fused
# kernel; before 17 every layer norm of the model becomes a chain of elementwise ops. The graph
# uses nothing newer. MIN_OPSET: the oldest opset whose graph has been compared with the model;
# export_onnx refuses older ones rather than write a graph nobody has checked.
DEFAULT_OPSET = 17
MIN_OPSET = 16
_DYNAMIC_AXES = {
    "image": {2: "height", 3: "width"},
    "input_ids": {0: "runs", 1: "tokens"},
    "token_mask": {0: "runs", 1: "tokens"},
    "self_attention_mask": {0: "runs", 1: "tokens", 2: "tokens"},
    "position_ids": {0: "runs", 1: "tokens"},
    "logits": {0: "runs"},
    "boxes": {0: "runs"},
}


class GroundingDINOGraph(nn.Module):
    """Wraps a ``GroundingDINO`` with the graph's tensor-only signature (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        token_mask: torch.Tensor,
        self_attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Returns:
            logits [R, Q, max_text_len] and boxes [R, Q, 4] (see the module doc).
        """
        features = self.model.image_features([image[0]])
        image_tokens = with_level_layout(features.flatten(), features.maps)
        # Every run sees the one image (chunks of a long prompt).
        image_tokens = image_tokens.index_select(torch.zeros_like(input_ids[:, 0]))
        tokens = TokenizedText(
            input_ids=input_ids,
            token_mask=token_mask,
            self_attention_mask=self_attention_mask,
            position_ids=position_ids,
            token_type_ids=torch.zeros_like(input_ids),
        )
        outputs = self.model.forward_tokens(image_tokens, tokens)
        return outputs["pred_logits"], outputs["pred_boxes"]


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """
    The model in its traceable form, for export only, through the modules' own switches:
    deformable attention on its ``gather`` kernel (ONNX has no weighted ``EmbeddingBag``, and
    ONNX Runtime's ``GridSample`` is slower than plain gathers), sizes from tensors
    (``traceable``, see ``grounding_dino.modeling.switches``), the text encoder's feature
    cache off (``cache_size``: a Python-side lookup that would trace into constants). Values
    equal the default paths (tests/test_onnx_export.py); all is restored on exit.
    """
    text_caches = (m for m in model.modules() if isinstance(getattr(m, "cache_size", None), int))
    with deformable_kernel(model, "gather"), tracing_mode(model) as n:
        with switched(text_caches, "cache_size", 0):
            logger.debug("export mode: %d modules on traceable size arithmetic", n)
            yield model


def example_inputs(model: nn.Module, height: int = 203, width: int = 317, length: int = 7):
    """
    Inputs to trace with: an image whose feature sizes are odd and not multiples of the Swin
    window at every stage (so no size happens to skip a padding), and one caption.
    """
    text = model.prompt_encoder.batch(
        model.prompt_encoder.runs_for_input(0, {"caption": "a cat . a remote control ."})
    )
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, height, width, generator=generator)
    return (
        image.to(model.device),
        text.input_ids.to(model.device),
        text.token_mask.to(model.device),
        text.self_attention_mask.to(model.device),
        text.position_ids.to(model.device),
    )


def export_onnx(model: nn.Module, path: str, *, opset: int = DEFAULT_OPSET) -> dict:
    """
    Exports ``model`` (a ``GroundingDINO`` in eval mode, on the CPU) to ``path``.

    Returns:
        ``{"seconds": export time, "bytes": file size, "tracer_warnings": count}``.

    Raises:
        ValueError: ``opset`` below :data:`MIN_OPSET`.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: the export is checked with opset {MIN_OPSET} or higher")
    model = model.eval()
    graph = GroundingDINOGraph(model).eval()
    start = time.perf_counter()
    with export_mode(model), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        inputs = example_inputs(model)
        torch.onnx.export(
            graph,
            inputs,
            path,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=_DYNAMIC_AXES,
            opset_version=opset,
            do_constant_folding=True,
        )
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            logger.warning("export: %s: %s", w.category.__name__, w.message)
    for w in tracer:
        # Python-side checks (sizes, errors) that the graph keeps as constants; the dynamic-size
        # tests show the outputs do not depend on them.
        logger.debug("tracer: %s", w.message)
    return {
        "seconds": time.perf_counter() - start,
        "bytes": os.path.getsize(path),
        "tracer_warnings": len(tracer),
    }


def write_metadata(path: str, model: nn.Module, opset: int) -> None:
    """Stores the sizes the graph was built with in the ONNX file's metadata
    (``grounding_dino.max_text_len``, ``.num_queries``, ``.tokenizer``, ``.opset``,
    ``.size_divisibility``), so that a
    predictor can check its config against them."""
    import onnx

    proto = onnx.load(path)
    values = {
        "max_text_len": model.max_text_len,
        "num_queries": model.query_selector.num_queries,
        "tokenizer": model.prompt_encoder.tokenizer_name_or_path or "",
        "opset": opset,
        "size_divisibility": model.backbone.size_divisibility,
    }
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = _METADATA_PREFIX + key, str(value)
    onnx.save(proto, path)


def read_metadata(metadata_map: dict) -> dict:
    """The ``grounding_dino.*`` entries of an ONNX Runtime session's custom metadata map."""
    return {
        key[len(_METADATA_PREFIX) :]: value
        for key, value in metadata_map.items()
        if key.startswith(_METADATA_PREFIX)
    }
