"""GoldG's GQA part: MDETR's final_mixed_train_no_coco.json, registered as mixed_train_no_coco."""

import json
import os

import cv2
import numpy as np
import pytest
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from grounding_dino.data.datasets import (
    MDETR_SPLITS,
    ODVG_SPLITS,
    register_all_grounding_datasets,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "mixed_train_no_coco"
# The training sets of configs/common/data/o365_goldg.py.
PRETRAINING = ["objects365_train_odvg", "flickr30k_train", NAME]

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
    _write_mdetr(root, NAME, RECORDS, first_image=2354786)


def _write_mdetr(root, name, records, first_image, with_images=False):
    """MDETR's grounding json of ``records`` at the builtin place of split ``name``."""
    json_rel, image_rel, _ = MDETR_SPLITS[name]
    os.makedirs(os.path.join(root, image_rel))
    os.makedirs(os.path.dirname(os.path.join(root, json_rel)), exist_ok=True)
    images, annotations = [], []
    for image_id, (caption, phrases) in enumerate(records):
        file_name = f"{first_image + image_id}.jpg"
        if with_images:
            cv2.imwrite(os.path.join(root, image_rel, file_name), np.zeros((300, 400, 3), np.uint8))
        images.append(
            {
                "file_name": file_name,
                "height": 300,
                "width": 400,
                "id": image_id,
                "original_id": first_image + image_id,
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
        for name in PRETRAINING:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

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


FLICKR = [
    ("a dog runs on the grass.", [("a dog", [20, 30, 100, 80]), ("the grass", [0, 200, 400, 100])])
]
OBJECTS365_NAMES = {"0": "person", "1": "cat", "2": "bus"}


def _write_objects365(root):
    """One Objects365 ODVG line (a cat, xyxy) and the label map, at the builtin places."""
    jsonl, image_rel, label_map = ODVG_SPLITS["objects365_train_odvg"]
    os.makedirs(os.path.join(root, image_rel))
    os.makedirs(os.path.dirname(os.path.join(root, jsonl)), exist_ok=True)
    cv2.imwrite(os.path.join(root, image_rel, "o1.jpg"), np.zeros((300, 400, 3), np.uint8))
    line = {
        "filename": "o1.jpg",
        "height": 300,
        "width": 400,
        "detection": {"instances": [{"bbox": [10, 20, 110, 220], "label": 1, "category": "cat"}]},
    }
    with open(os.path.join(root, jsonl), "w") as f:
        f.write(json.dumps(line) + "\n")
    with open(os.path.join(root, label_map), "w") as f:
        json.dump(OBJECTS365_NAMES, f)


def _phrases(out):
    return [" ".join(out["caption"][b:e] for b, e in spans) for spans in out["tokens_positive"]]


def test_goldg_config_trains_on_objects365_flickr_and_gqa(registered_under, minilm_dir):
    """
    Proves that ``o365_goldg.py`` trains on Objects365, Flickr30k and GQA: its training
    dataset node reads the records of all three from their standard places, and its mapper
    (the classes of Objects365's label map) makes the Objects365 record a detection caption
    of those classes and the GoldG records grounding captions with their phrases.
    """
    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    root = str(registered_under)
    _write_mdetr(root, NAME, RECORDS, first_image=2354786, with_images=True)
    _write_mdetr(root, "flickr30k_train", FLICKR, first_image=1000, with_images=True)
    _write_objects365(root)
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "common", "data", "o365_goldg.py"))
    cfg.model = OmegaConf.create(
        {"prompt_encoder": {"tokenizer_name_or_path": minilm_dir}, "max_text_len": 256}
    )
    records = instantiate(cfg.dataloader.train.dataset)
    by_source = {}
    for record in records:
        source = os.path.relpath(record["file_name"], root).split(os.sep)[0]
        by_source.setdefault(source, []).append(record)
    assert {k: len(v) for k, v in by_source.items()} == {
        "objects365": 1,
        "flickr30k": len(FLICKR),
        "gqa": len(RECORDS),
    }
    # Without the random crops and flips of training, which may drop a phrase's box or swap
    # "left" and "right": what is checked here is where the records come from and how the
    # mapper turns each kind into a caption.
    cfg.dataloader.train.mapper.augmentations = []
    mapper = instantiate(cfg.dataloader.train.mapper)
    detection = mapper(by_source["objects365"][0])
    names = sorted(OBJECTS365_NAMES.values())
    assert sorted(detection["caption"][: -len(" .")].split(" . ")) == names
    assert _phrases(detection) == ["cat"]
    for source, expected in (("flickr30k", FLICKR), ("gqa", RECORDS)):
        for record, (_, phrases) in zip(by_source[source], expected):
            out = mapper(record)
            assert _phrases(out) == [phrase for phrase, _ in phrases], source
            assert (out["instances"].gt_positive_map.sum(1) > 0.99).all()
