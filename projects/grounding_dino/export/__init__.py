"""Export of Grounding DINO to ONNX (``python -m grounding_dino.export onnx ...``).

:func:`export_onnx` writes the network between preprocessing and post-processing as one
graph with dynamic image size and caption length (see :mod:`.graph` and docs/interfaces.md);
``grounding_dino.deploy.OnnxPredictor`` runs it with ONNX Runtime.
"""

from .graph import (
    DEFAULT_OPSET,
    INPUT_NAMES,
    OUTPUT_NAMES,
    GroundingDINOGraph,
    export_mode,
    export_onnx,
    read_metadata,
    write_metadata,
)

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "GroundingDINOGraph",
    "export_mode",
    "export_onnx",
    "read_metadata",
    "write_metadata",
]
