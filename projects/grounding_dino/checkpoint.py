"""A detectron2 checkpointer that never unpickles code from checkpoint files."""

from detectron2.checkpoint import DetectionCheckpointer

from .convert.checkpoint import load_checkpoint_file

__all__ = ["GroundingDINOCheckpointer"]


class GroundingDINOCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` whose file reading goes through
    ``torch.load(weights_only=True)`` (or safetensors). detectron2's own loader unpickles
    with ``weights_only=False`` on torch 2.3, so a malicious ``.pth`` would run code on load;
    here it is refused with an error naming the file. Missing and unexpected keys are logged
    by detectron2 as usual. Optimizer/scheduler state saved by this project's own training
    holds only tensors and plain containers, so ``--resume`` reads it safely too.
    """

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            raise ValueError(f"{filename}: pickled detectron2 model-zoo files are not supported")
        data = load_checkpoint_file(filename)
        if "model" not in data:
            data = {"model": data}
        data.setdefault("matching_heuristics", False)
        return data
