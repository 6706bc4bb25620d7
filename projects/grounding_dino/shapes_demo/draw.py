"""Pictures of the demo job (``tools/demo_job.py``): predictions drawn on validation images."""

import os
from typing import List

import cv2
import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode
from detectron2.utils.visualizer import Visualizer

from ..io.images import read_image_file
from ..segment import add_instances_masks

__all__ = ["draw_predictions", "pick_records"]


def _draw(
    image_rgb: np.ndarray,
    boxes,
    labels: List[str],
    path: str,
    title: str = "",
    gt_boxes=(),
    masks=None,
) -> None:
    vis = Visualizer(image_rgb, scale=2.0)
    for gt_box in gt_boxes:
        vis.draw_box(gt_box, edge_color="w", line_style="--")
    if len(boxes):
        vis.overlay_instances(
            boxes=np.asarray(boxes, dtype=np.float32),
            labels=labels,
            masks=None if masks is None else masks.numpy(),
        )
    if title:
        vis.draw_text(title, (4, 2), horizontal_alignment="left", color="w", font_size=9)
    out = vis.get_output().get_image()
    cv2.imwrite(path, out[:, :, ::-1])


def pick_records(records: List[dict], num: int, seed: int) -> List[dict]:
    """``num`` records drawn at random with a fixed ``seed`` (the same pictures on every run,
    and not chosen by hand), in dataset order."""
    num = min(num, len(records))
    chosen = np.random.default_rng(seed).choice(len(records), size=num, replace=False)
    return [records[i] for i in sorted(chosen.tolist())]


@torch.no_grad()
def draw_predictions(
    cfg,
    model,
    output_dir: str,
    num: int,
    threshold: float,
    seed: int = 0,
    mask_stage=None,
    tasks=("det", "rec"),
) -> List[str]:
    """
    Draws detections on ``shapes_val`` ("det") and top-1 REC boxes on ``shapes_rec_val``
    ("rec"), on ``num`` images of each picked by :func:`pick_records` with ``seed``; the ground
    truth boxes are dashed white. With ``mask_stage`` the detections' masks are drawn too.
    """
    model.eval()
    paths = []
    for dataset, prefix in (("shapes_val", "det"), ("shapes_rec_val", "rec")):
        if prefix not in tasks:
            continue
        cfg.dataloader.test.dataset.names = dataset
        mapper = instantiate(cfg.dataloader.test.mapper)
        records = DatasetCatalog.get(dataset)
        for k, record in enumerate(pick_records(records, num, seed)):
            inputs = mapper(record)
            output = model([inputs])[0]
            instances = output["instances"]
            image = inputs["image"].permute(1, 2, 0).numpy()
            if prefix == "rec":
                top = instances.scores.argmax() if len(instances) else None
                boxes = [] if top is None else instances.pred_boxes.tensor[top][None].numpy()
                labels = [] if top is None else [f"{float(instances.scores[top]):.2f}"]
                gt = BoxMode.convert(
                    list(record["annotations"][0]["bbox"]),
                    record["annotations"][0]["bbox_mode"],
                    BoxMode.XYXY_ABS,
                )
                title = f'"{record["caption"]}"'
                path = os.path.join(output_dir, f"{prefix}_{k}.png")
                _draw_rec(image, boxes, labels, gt, path, title)
            else:
                keep = _dedup(instances, threshold)
                masks = None
                if mask_stage is not None:
                    image_rgb = read_image_file(record["file_name"], format="RGB")
                    masks = add_instances_masks(instances[keep], image_rgb, mask_stage).pred_masks
                boxes = instances.pred_boxes.tensor[keep].numpy()
                labels = [f"{output['phrases'][i]} {float(instances.scores[i]):.2f}" for i in keep]
                path = os.path.join(output_dir, f"{prefix}_{k}.png")
                gt = [
                    BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                    for a in record["annotations"]
                ]
                _draw(image, boxes, labels, path, gt_boxes=gt, masks=masks)
            paths.append(path)
    return paths


def _draw_rec(image, boxes, labels, gt_box, path: str, title: str) -> None:
    vis = Visualizer(image, scale=2.0)
    vis.draw_box(gt_box, edge_color="w", line_style="--")
    if len(boxes):
        vis.overlay_instances(
            boxes=np.asarray(boxes, dtype=np.float32),
            labels=labels,
            assigned_colors=[(0.1, 0.9, 0.1)],
        )
    vis.draw_text(title, (4, 2), horizontal_alignment="left", color="w", font_size=9)
    cv2.imwrite(path, vis.get_output().get_image()[:, :, ::-1])


def _dedup(instances, threshold: float, iou: float = 0.5) -> List[int]:
    """Indices of detections above ``threshold`` after class-agnostic NMS (for drawing)."""
    from torchvision.ops import nms

    keep = (instances.scores > threshold).nonzero().flatten()
    if len(keep) == 0:
        return []
    order = nms(instances.pred_boxes.tensor[keep], instances.scores[keep], iou)
    return keep[order].tolist()[:20]
