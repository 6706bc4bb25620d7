"""Flickr30k entities phrase grounding evaluation (Recall@k, MDETR's protocols)."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from grounding_dino.data.datasets import register_mdetr
from grounding_dino.evaluation import Flickr30kEvaluator, build_evaluator
from grounding_dino.text import normalize_caption
from grounding_dino.text.tokenizer import load_tokenizer

SIZE = 100
# caption, [(phrase, [gt boxes xyxy])]
CAPTIONS = [
    (
        "A man in a red shirt holds two dogs.",
        [
            ("A man", [[10, 10, 40, 95]]),
            ("a red shirt", [[15, 30, 38, 60]]),
            ("two dogs", [[50, 60, 70, 90], [80, 60, 99, 90]]),
        ],
    ),
    ("A cat next to a ball.", [("A cat", [[0, 0, 30, 30]]), ("a ball", [[40, 40, 60, 60]])]),
]
WRONG = [70, 5, 95, 25]  # overlaps no ground-truth box


def _write_flickr(root, name, with_images=False):
    """An MDETR-style separateGT file: one box per annotation, tokens_positive_eval per phrase."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    for image_id, (caption, phrases) in enumerate(CAPTIONS, start=1):
        eval_spans = []
        for phrase, boxes in phrases:
            beg = caption.index(phrase)
            eval_spans.append([[beg, beg + len(phrase)]])
            for x1, y1, x2, y2 in boxes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                        "tokens_positive": [[beg, beg + len(phrase)]],
                    }
                )
        file_name = f"{image_id}.png"
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": SIZE,
                "width": SIZE,
                "caption": caption,
                "tokens_positive_eval": eval_spans,
                "sentence_id": 0,
                "original_img_id": 1000 + image_id,
            }
        )
        if with_images:
            image = np.full((SIZE, SIZE, 3), 200, np.uint8)
            cv2.rectangle(image, (10, 10), (40, 95), (0, 0, 180), -1)
            cv2.imwrite(os.path.join(root, "images", file_name), image)
    json_file = os.path.join(root, "flickr.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": []}, f)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_mdetr(name, json_file, os.path.join(root, "images"))  # evaluator_type "flickr30k"


# --------------------------------------------------------------- an independent recall
def _iou(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _phrase_tokens(tokenizer, caption, phrase):
    """Token indices of ``phrase`` in the normalised caption, from the tokenizer's offsets."""
    text = normalize_caption(caption)
    beg = text.index(phrase.lower())
    end = beg + len(phrase)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > beg]


def brute_force_recall(tokenizer, outputs, merged, topk=(1, 5, 10), iou_threshold=0.5):
    """R@k from first principles: rank by the phrase's best token score, numpy IoU."""
    hits = {k: [] for k in topk}
    for (caption, phrases), (boxes, token_scores) in zip(CAPTIONS, outputs):
        boxes, token_scores = np.asarray(boxes, float), np.asarray(token_scores, float)
        for phrase, gt in phrases:
            if merged:
                gt = np.asarray(gt, float)
                gt = [[gt[:, 0].min(), gt[:, 1].min(), gt[:, 2].max(), gt[:, 3].max()]]
            tokens = _phrase_tokens(tokenizer, caption, phrase)
            score = token_scores[:, tokens].max(axis=1)
            ranked = sorted(range(len(boxes)), key=lambda i: (-score[i], i))
            best = [max(_iou(boxes[i], g) for g in gt) for i in ranked]
            for k in topk:
                hits[k].append(any(v >= iou_threshold for v in best[:k]))
    return {f"R@{k}": 100.0 * np.mean(v) for k, v in hits.items()}


# ----------------------------------------------------------------- hand-made predictions
def _hand_made_outputs(tokenizer):
    """
    Caption 1: "man" is right at rank 1; "a red shirt" at rank 2 (rank 1 has the highest
    single token score, which MDETR's max ranks first; a mean over the phrase would not);
    "two dogs" has one dog at rank 1 and the union of both at rank 2. Caption 2: "a cat" is
    never found, "a ball" at rank 7 of 12 boxes.
    """
    outputs = []
    (c1, p1), (c2, p2) = CAPTIONS
    n1 = len(tokenizer(normalize_caption(c1))["input_ids"])
    man, shirt, dogs = (_phrase_tokens(tokenizer, c1, p) for p, _ in p1)
    boxes = [p1[0][1][0], WRONG, p1[1][1][0], p1[2][1][0], [50, 60, 99, 90]]
    scores = np.zeros((5, n1))
    scores[0, man] = 0.9
    scores[1, shirt[-1]] = 0.8  # one token high
    scores[2, shirt] = 0.6  # all tokens medium
    scores[3, dogs] = 0.7
    scores[4, dogs] = 0.5
    outputs.append((boxes, scores))
    n2 = len(tokenizer(normalize_caption(c2))["input_ids"])
    cat, ball = (_phrase_tokens(tokenizer, c2, p) for p, _ in p2)
    boxes, scores = [], np.zeros((12, n2))
    for k in range(12):
        boxes.append(p2[1][1][0] if k == 6 else [WRONG[0], WRONG[1] + k, WRONG[2], WRONG[3] + k])
        scores[k, ball] = 0.9 - 0.05 * k
        scores[k, cat] = 0.3
    outputs.append((boxes, scores))
    return outputs


def _run(evaluator, outputs):
    evaluator.reset()
    for image_id, (boxes, token_scores) in enumerate(outputs, start=1):
        instances = Instances((SIZE, SIZE))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.token_scores = torch.tensor(token_scores, dtype=torch.float32)
        instances.scores = instances.token_scores.max(dim=1).values
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()


@pytest.mark.parametrize(
    "merged, expected",
    [
        (False, {"R@1": 40.0, "R@5": 60.0, "R@10": 80.0}),  # any box: the dog at rank 1
        (True, {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0}),  # merged: the union at rank 2
    ],
)
def test_recall_on_hand_made_predictions(tmp_path, minilm_dir, merged, expected):
    _write_flickr(str(tmp_path), "flickr_hand_made")
    tokenizer = load_tokenizer(minilm_dir)
    outputs = _hand_made_outputs(tokenizer)
    evaluator = Flickr30kEvaluator(
        "flickr_hand_made", str(tmp_path / "out"), tokenizer=minilm_dir, merge_boxes=merged
    )
    results = _run(evaluator, outputs)["flickr30k"]
    assert results == pytest.approx(expected)
    assert results == pytest.approx(brute_force_recall(tokenizer, outputs, merged))
    with open(tmp_path / "out" / "flickr30k_predictions.json") as f:
        assert len(json.load(f)) == 5  # one record per phrase


def test_build_evaluator_for_flickr_datasets(tmp_path, minilm_dir):
    _write_flickr(str(tmp_path), "flickr_build")
    evaluator = build_evaluator("flickr_build", tokenizer=minilm_dir)
    assert isinstance(evaluator, Flickr30kEvaluator)
    # The builtin splits are registered lazily: building does not read their files.
    assert MetadataCatalog.get("flickr30k_val").evaluator_type == "flickr30k"
    assert isinstance(build_evaluator("flickr30k_val", tokenizer=minilm_dir), Flickr30kEvaluator)


def test_bad_outputs_are_named(tmp_path, minilm_dir):
    _write_flickr(str(tmp_path), "flickr_bad")
    evaluator = Flickr30kEvaluator("flickr_bad", tokenizer=minilm_dir)
    outputs = _hand_made_outputs(load_tokenizer(minilm_dir))
    boxes, scores = outputs[0]
    with pytest.raises(ValueError, match="token_scores has 4 columns but the caption"):
        _run(evaluator, [(boxes, scores[:, :4])])
    with pytest.raises(KeyError, match="image_id=99 is not a record of dataset 'flickr_bad'"):
        evaluator.process([{"image_id": 99}], [{"instances": None}])
    instances = Instances((SIZE, SIZE), pred_boxes=Boxes(torch.zeros(0, 4)))
    with pytest.raises(ValueError, match="needs 'instances' with 'token_scores'"):
        evaluator.process([{"image_id": 1}], [{"instances": instances}])


def test_end_to_end_with_the_tiny_model(tmp_path, minilm_dir, tiny_model):
    """Mapper -> random tiny model -> evaluator: the recall the evaluator reports equals the
    brute-force recall of the outputs the model returned."""
    from detectron2.config import instantiate
    from detectron2.evaluation import DatasetEvaluator, inference_on_dataset

    from grounding_dino import model_zoo

    _write_flickr(str(tmp_path), "flickr_e2e", with_images=True)
    cfg = model_zoo.get_config("shapes_tiny.py")
    model = tiny_model
    # shapes_tiny.py's box_threshold is 0: every query is returned, 100 boxes per caption.
    assert model.inference_settings.box_threshold == 0.0
    test = cfg.dataloader.test  # the config's test loader and mapper, on the captions
    test.dataset.names = "flickr_e2e"
    del test.mapper["thing_classes"]
    test.batch_size = 2
    loader = instantiate(test)

    class Recorder(DatasetEvaluator):
        def reset(self):
            self.outputs = {}

        def process(self, inputs, outputs):
            for input, output in zip(inputs, outputs):
                instances = output["instances"].to("cpu")
                self.outputs[input["image_id"]] = (
                    instances.pred_boxes.tensor.numpy(),
                    instances.token_scores.numpy(),
                )

        def evaluate(self):
            return {}

    recorder = Recorder()
    # A low IoU threshold: the random model's boxes then hit at some ranks, not at none.
    evaluator = build_evaluator("flickr_e2e", tokenizer=minilm_dir, iou_threshold=0.1)
    results = inference_on_dataset(model, loader, [recorder, evaluator])["flickr30k"]
    outputs = [recorder.outputs[i] for i in (1, 2)]
    assert all(len(boxes) >= 10 for boxes, _ in outputs)
    expected = brute_force_recall(load_tokenizer(minilm_dir), outputs, False, iou_threshold=0.1)
    assert results == pytest.approx(expected)
    assert max(results.values()) > 0  # (R@10 = 20 here: one of the 5 phrases)
