"""
Training of a box-prompted segmenter (transformers' ``SamModel``) with the project's engine
(:func:`grounding_dino.engine.do_train`: detectron2's trainer, hooks and checkpointer): a
small SAM from scratch (``configs/sam_shapes.py``, the demo's), or a user's SAM folder
fine-tuned on their own COCO masks (``configs/finetune_sam_coco_format.py``). The trained model
is written as a transformers folder (``save_pretrained`` with its ``SamProcessor``) that
``--sam DIR`` and :meth:`~grounding_dino.segment.MaskStage.from_pretrained` load.
"""

import logging
import os
import shutil
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from detectron2.engine import HookBase
from detectron2.utils import comm
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..io.atomic import temporary_directory
from .loss import sam_mask_losses

__all__ = ["build_sam", "sam_processor", "SamForBoxTraining", "SaveSamFolder"]

logger = logging.getLogger(__name__)


def sam_processor(path: Optional[str] = None, image_size: int = 1024):
    """
    The ``SamProcessor`` of a segmenter folder (``path``), or for a new model a processor that
    resizes the longest side to ``image_size`` and pads to ``image_size`` squared (SAM's own
    pre-processing, at another size).
    """
    from transformers import SamImageProcessor, SamProcessor

    if path is not None:
        from .loading import load_segmenter

        return _check_sam(load_segmenter(path), path)[2]
    size = int(image_size)
    image_processor = SamImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size}
    )
    return SamProcessor(image_processor=image_processor)


def _check_sam(loaded, path):
    kind = loaded[0]
    if kind.name != "sam":
        raise ValueError(
            f"{path} holds a {kind.name} segmenter; training supports SAM folders (model_type "
            "'sam', transformers' SamModel)"
        )
    return loaded


def build_sam(
    path: Optional[str] = None, config: Optional[Mapping] = None, position_scale: float = 1.0
) -> nn.Module:
    """
    A transformers ``SamModel``: the weights of a segmenter folder (``path``), or a new
    randomly initialised one from ``config`` (``SamConfig`` arguments: ``vision_config``,
    ``prompt_encoder_config``, ``mask_decoder_config`` dicts), its positions encoded with
    random Fourier features of std ``position_scale`` (SAM's: 1).
    """
    from transformers import SamConfig, SamModel

    if (path is None) == (config is None):
        raise ValueError("build_sam: give exactly one of path (a SAM folder) and config")
    if path is not None:
        from .loading import load_segmenter

        return _check_sam(load_segmenter(path), path)[1]
    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    model = SamModel(SamConfig(**config))
    # transformers initialises for loading pretrained weights, not for training: the vision
    # encoder's weights get std 1e-10 (its output is ~1e-21, no gradient reaches it) and the
    # rest std 0.02, which at a small width shrinks the mask logits to ~1e-5. The original SAM
    # uses PyTorch's default initialisation; so does a new model here.
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            module.reset_parameters()
    # transformers draws the random Fourier features of the positions with std hidden_size // 2
    # (a buffer that pretrained weights overwrite); the original SAM draws them with std 1, so
    # that neighbouring embedding cells get similar codes. A new model starts from SAM's.
    model.shared_image_embedding.positional_embedding.normal_(std=position_scale)
    return model


class SamForBoxTraining(nn.Module):
    """
    A ``SamModel`` and its processor, trained with box prompts: ``forward`` takes the batches
    of :class:`~grounding_dino.segment.data.SamBoxMapper` and returns SAM's losses
    (:func:`~grounding_dino.segment.loss.sam_mask_losses`). One mask per box
    (``multimask_output=False``, as the mask stage asks for); the losses are computed at the
    decoder's low resolution, the ground truth downsampled by area to it.
    """

    def __init__(
        self,
        sam: nn.Module,
        processor,
        *,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.25,
    ):
        super().__init__()
        self.sam = sam
        self.processor = processor
        self.loss_weights = dict(
            focal_weight=focal_weight,
            dice_weight=dice_weight,
            iou_weight=iou_weight,
            focal_alpha=focal_alpha,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def predict_low_res(self, batched_inputs: List[Dict]):
        """
        Returns:
            (logits, iou): the concatenated (K, h, w) low-resolution mask logits and (K,) IoU
            predictions of every box of the batch, in input order.
        """
        pixels = torch.stack([x["pixel_values"] for x in batched_inputs]).to(self.device)
        # The vision encoder directly: SamModel.get_image_embeddings runs without gradients.
        embeddings = self.sam.vision_encoder(pixels)[0]
        logits, iou = [], []
        for i, inputs in enumerate(batched_inputs):
            output = self.sam(
                image_embeddings=embeddings[i : i + 1],
                input_boxes=inputs["input_boxes"][None].to(self.device),
                multimask_output=False,
            )
            logits.append(output.pred_masks[0, :, 0])
            iou.append(output.iou_scores[0, :, 0])
        return torch.cat(logits), torch.cat(iou)

    def forward(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """
        Args:
            batched_inputs: mapper outputs with "pixel_values" (3, S, S), "input_boxes" (K, 4)
                and "gt_masks" (K, S, S).

        Returns:
            {"loss_mask_focal", "loss_mask_dice", "loss_mask_iou"}.
        """
        logits, iou = self.predict_low_res(batched_inputs)
        gt = torch.cat([x["gt_masks"] for x in batched_inputs]).to(self.device)
        targets = F.interpolate(gt[:, None].float(), size=logits.shape[-2:], mode="area")[:, 0]
        return sam_mask_losses(logits, targets, iou, **self.loss_weights)

    def save_folder(self, folder: str) -> str:
        """
        Writes the model (``save_pretrained``: config.json, model.safetensors) and its processor
        (preprocessor_config.json) to ``folder``, a transformers folder that
        :meth:`MaskStage.from_pretrained` and ``--sam`` load. The files are written to a
        temporary folder first that then replaces ``folder``.
        """
        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        partial = temporary_directory(folder)
        try:
            self.sam.save_pretrained(partial)
            self.processor.save_pretrained(partial)
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.rename(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return folder


class SaveSamFolder(HookBase):
    """
    Writes the trained segmenter as a transformers folder (:meth:`SamForBoxTraining.save_folder`)
    when training has run to its last iteration (not after a failed one); main process only.
    Register it with ``train.hooks = [L(SaveSamFolder)(folder="${train.output_dir}/sam")]``.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def after_train(self):
        if not comm.is_main_process() or self.trainer.iter < self.trainer.max_iter:
            return
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, SamForBoxTraining):
            raise TypeError(f"SaveSamFolder saves a SamForBoxTraining, not {type(model).__name__}")
        model.save_folder(self.folder)
        logger.info(f"Wrote the trained segmenter to {self.folder} (--sam {self.folder})")
