"""GoldG's GQA part: MDETR's final_mixed_train_no_coco.json, registered as mixed_train_no_coco."""

import json
import os

import pytest
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from grounding_dino.data.datasets import MDETR_SPLITS, register_all_grounding_datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "mixed_train_no_coco"

# (caption, [(phrase, xywh box)]) as MDETR's combined VG/GQA records: several expressions in
# one caption, each ending in "." or "?".
RECORDS = [
    (
        "the man wearing a white shirt. Is the giraffe to the left of the tree?",
        [
            ("the man", [10, 20, 50, 100]),
            ("a white shirt", [15, 40, 30, 30]),
            ("the giraffe", [100, 10, 60, 120]),
            ("the tree", [200, 0, 40, 150]),
        ],
    ),
    ("a red bus on the street.", [("a red bus", [5, 5, 200, 100])]),
]


def _write_mixed(root):
    """The annotation file and image folder at the places the builtin table names."""
    json_rel, image_rel, task = MDETR_SPLITS[NAME]
    assert (json_rel, image_rel, task) == (
        "mdetr_annotations/final_mixed_train_no_coco.json",
        "gqa/images",
        "grounding",
    )
    os.makedirs(os.path.join(root, image_rel))
    os.makedirs(os.path.dirname(os.path.join(root, json_rel)))
    images, annotations = [], []
    for image_id, (caption, phrases) in enumerate(RECORDS):
        images.append(
            {
                "file_name": f"{2354786 + image_id}.jpg",
                "height": 300,
                "width": 400,
                "id": image_id,
                "original_id": 2354786 + image_id,
                "caption": caption,
                "dataset_name": "mixed",
                "tokens_negative": [[0, len(caption)]],
                "data_source": "vg",
            }
        )
        for phrase, box in phrases:
            beg = caption.index(phrase)
            annotations.append(
                {
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "image_id": image_id,
                    "category_id": 1,
                    "id": len(annotations),
                    "bbox": box,
                    "tokens_positive": [[beg, beg + len(phrase)]],
                }
            )
    with open(os.path.join(root, json_rel), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1}]}, f)


@pytest.fixture
def registered_under(tmp_path):
    """Registers the builtin splits under tmp_path (restoring the default root afterwards)."""

    def drop():
        if NAME in DatasetCatalog.list():
            DatasetCatalog.remove(NAME)
            MetadataCatalog.remove(NAME)

    drop()
    register_all_grounding_datasets(str(tmp_path))
    yield tmp_path
    drop()
    register_all_grounding_datasets()


def test_gqa_records_load_with_captions_and_spans(registered_under):
    root = str(registered_under)
    _write_mixed(root)
    assert MetadataCatalog.get(NAME).task == "grounding"
    records = DatasetCatalog.get(NAME)
    assert len(records) == len(RECORDS)
    for record, (caption, phrases) in zip(records, RECORDS):
        assert record["caption"] == caption and "task" not in record
        assert record["file_name"].startswith(os.path.join(root, "gqa", "images"))
        assert len(record["annotations"]) == len(phrases)
        for anno, (phrase, box) in zip(record["annotations"], phrases):
            ((beg, end),) = anno["tokens_positive"]
            assert caption[beg:end] == phrase
            assert anno["bbox"] == box and anno["bbox_mode"] == BoxMode.XYWH_ABS


def test_goldg_config_trains_on_flickr_and_gqa():
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "common", "data", "o365_goldg.py"))
    names = list(cfg.dataloader.train.dataset.names)
    assert names == ["objects365_train_odvg", "flickr30k_train", NAME]
