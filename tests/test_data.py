"""Data side: the mapper (captions, positive maps, flips, negatives, the 256-token cap),
augmentations, dataset registration, bad-data errors and the COCO -> ODVG converter."""

import importlib.util
import json
import logging
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from grounding_dino.data import (
    GroundingDatasetMapper,
    build_test_augmentations,
    build_train_augmentations,
    get_thing_classes,
    load_mdetr_json,
    register_mdetr,
    register_odinw,
    register_odvg,
)
from grounding_dino.text import PromptEncoder, count_tokens, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["person", "traffic light", "cat", "dog", "hot dog", "left shoe", "zebra", "kite"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def _unique(name: str) -> str:
    return f"test_{name}_{uuid.uuid4().hex[:8]}"


def _write_image(path, width=80, height=60):
    """An image whose left half is red and right half blue (RGB order checks)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2 :, 2] = 255
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def image_file(tmp_path):
    return _write_image(tmp_path / "img.png")


def _det_record(file_name, boxes_classes, width=80, height=60):
    return {
        "file_name": file_name,
        "height": height,
        "width": width,
        "image_id": 7,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": c}
            for b, c in boxes_classes
        ],
    }


def _grounding_record(file_name, caption, regions, task=None):
    record = {
        "file_name": file_name,
        "height": 60,
        "width": 80,
        "image_id": 11,
        "caption": caption,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "tokens_positive": spans}
            for b, spans in regions
        ],
    }
    if task:
        record["task"] = task
    return record


def _mapper(tokenizer, augs=(), is_train=True, **kwargs):
    kwargs.setdefault("thing_classes", CLASSES)
    kwargs.setdefault("drop_warning_period", 1000)
    return GroundingDatasetMapper(is_train, augmentations=list(augs), tokenizer=tokenizer, **kwargs)


def _positive_tokens(tokenizer, caption, row):
    tokens = tokenizer(caption).tokens()
    return [tokens[i] for i in row.nonzero().flatten().tolist()]


def test_detection_mapping(tokenizer, image_file):
    record = _det_record(image_file, [((2, 3, 30, 40), 1), ((40, 5, 70, 50), 2), ((1, 1, 9, 9), 1)])
    out = _mapper(tokenizer)(record)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 60, 80)
    assert out["image"][0, 0, 0] == 255 and out["image"][2, 0, 0] == 0  # RGB order
    caption = out["caption"]
    assert caption.endswith(" .") and caption == caption.lower()
    names = caption[: -len(" .")].split(" . ")
    assert sorted(names) == sorted(CLASSES)  # every class fits: all negatives are sampled
    inst = out["instances"]
    assert inst.gt_boxes.tensor.shape == (3, 4) and inst.gt_positive_map.shape == (3, 256)
    assert torch.allclose(inst.gt_positive_map.sum(1), torch.ones(3), atol=1e-5)
    for k, (cls, spans) in enumerate(zip(inst.gt_classes.tolist(), out["tokens_positive"])):
        name = CLASSES[record["annotations"][k]["category_id"]]
        assert names[cls] == name
        assert " ".join(caption[b:e] for b, e in spans) == name
        assert _positive_tokens(tokenizer, caption, inst.gt_positive_map[k]) == name.split()
    assert out["height"] == 60 and out["width"] == 80
    assert out["input_ids"] == tokenizer(caption)["input_ids"]  # tokenised once, for the model


def test_detection_negatives_sampled_and_shuffled(tokenizer, image_file):
    record = _det_record(image_file, [((2, 3, 30, 40), 3)])
    np.random.seed(0)
    mapper = _mapper(tokenizer, max_categories=3)
    captions = [mapper(record)["caption"] for _ in range(20)]
    for caption in captions:
        names = caption[: -len(" .")].split(" . ")
        assert len(names) == 3 and "dog" in names
    assert len(set(captions)) > 5  # negatives and order are random
    fixed = _mapper(tokenizer, shuffle_categories=False)(record)["caption"]
    assert fixed == " . ".join(CLASSES) + " ."


@pytest.mark.parametrize("bad", ["None", 0, -2, 2.5, True])
def test_max_categories_refused_with_a_message(tokenizer, bad):
    # "None" is what a command-line override max_categories=None gives (hydra's null is None).
    with pytest.raises(ValueError, match=r"max_categories must be a positive integer.*=null"):
        _mapper(tokenizer, max_categories=bad)


def test_detection_256_token_cap(tokenizer, image_file):
    many = [f"thermoregulation electroencephalography {i}" for i in range(300)]
    record = _det_record(image_file, [((2, 3, 30, 40), 5), ((9, 9, 60, 50), 299)])
    mapper = _mapper(tokenizer, thing_classes=many)
    np.random.seed(1)
    for _ in range(5):
        out = mapper(record)
        n_tokens = count_tokens(tokenizer, out["caption"])
        assert 240 < n_tokens <= 256
        names = out["caption"][: -len(" .")].split(" . ")
        assert many[5] in names and many[299] in names and len(names) < 300
        assert (out["instances"].gt_positive_map.sum(1) > 0.99).all()


def test_long_caption_ids_and_positive_maps(tokenizer, image_file, minilm_dir):
    """A grounding caption over 256 tokens: the model gets its whole ids (it cuts them at 256
    as the official model does) and the positive maps are the official ones on the caption
    truncated at 256 tokens; the model's prompt encoder reuses the ids."""
    from groundingdino.util.vl_utils import create_positive_map_from_span

    caption = " . ".join(f"the dog {i}" for i in range(80)) + " . a cat on the left"
    regions = [((2, 3, 30, 40), [[0, 7]]), ((5, 5, 9, 9), [[len(caption) - 15, len(caption)]])]
    regions += [
        ((5, 5, 9, 9), [[caption.index(f"dog {i}"), caption.index(f"dog {i}") + 6]])
        for i in (61, 62, 63, 64)
    ]  # around the 256th token
    record = _grounding_record(image_file, caption, regions)
    prompt_encoder = PromptEncoder(tokenizer_name_or_path=minilm_dir, max_text_len=256)
    out = _mapper(prompt_encoder)(record)
    whole = tokenizer(out["caption"])["input_ids"]
    assert len(whole) > 256 and out["input_ids"] == whole
    truncated = tokenizer(out["caption"], truncation=True, max_length=256)
    spans = [s for _, s in regions]
    official = create_positive_map_from_span(truncated, spans)
    grounded = (official > 0).any(1)
    assert 2 < int(grounded.sum()) < len(regions)  # some phrases lie beyond the cut
    assert torch.equal(out["instances"].gt_positive_map, official[grounded])
    (run,) = prompt_encoder.runs_for_input(0, out)
    assert run.input_ids == whole and run.caption == out["caption"]
    assert prompt_encoder.batch([run]).input_ids.shape == (1, 256)
    with pytest.raises(ValueError, match="max_text_len=128 differs"):
        _mapper(prompt_encoder, max_text_len=128)


def test_empty_and_degenerate_boxes(tokenizer, image_file, caplog):
    out = _mapper(tokenizer)(_det_record(image_file, []))
    assert len(out["instances"]) == 0
    assert out["instances"].gt_positive_map.shape == (0, 256)
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)
    assert out["tokens_positive"] == [] and out["caption"].endswith(" .")

    boxes = [
        ((2, 3, 30, 40), 0),
        ((90, 10, 120, 20), 2),
        ((10, 10, 10, 30), 3),
        ((-5, 2, 100, 70), 4),
    ]
    with caplog.at_level(logging.WARNING, logger="grounding_dino.data.mapper"):
        out = _mapper(tokenizer)(_det_record(image_file, boxes))
    assert out["dropped"] == {"zero_area": 2}
    assert "zero_area=2, past_token_limit=0, category_overflow=0 of 4 boxes" in caplog.text
    inst = out["instances"]
    assert len(inst) == 2
    assert inst.gt_boxes.tensor.tolist()[1] == [0.0, 2.0, 80.0, 60.0]  # clipped
    names = out["caption"][:-2].split(" . ")
    assert [names[c] for c in inst.gt_classes.tolist()] == ["person", "hot dog"]


def test_flip_swaps_left_right_and_boxes(tokenizer, image_file):
    caption = "The dog on the LEFT of a cat"
    regions = [
        ((5, 5, 30, 40), [[0, 7]]),
        ((40, 5, 75, 50), [[15, 19]]),
        ((1, 1, 8, 8), [[25, 28]]),
    ]
    record = _grounding_record(image_file, caption, regions)
    out = _mapper(tokenizer, augs=[T.HFlipTransform(80)])(record)
    assert out["caption"] == "the dog on the right of a cat ."
    assert [out["caption"][b:e] for ((b, e),) in out["tokens_positive"]] == [
        "the dog",
        "right",
        "cat",
    ]
    inst = out["instances"]
    assert inst.gt_boxes.tensor[0].tolist() == [50.0, 5.0, 75.0, 40.0]
    assert _positive_tokens(tokenizer, out["caption"], inst.gt_positive_map[1]) == ["right"]
    assert out["image"][2, 0, 0] == 255  # blue half is now on the left
    assert inst.gt_classes.tolist() == [0, 1, 2]  # phrases in caption order

    unflipped = _mapper(tokenizer)(record)
    assert unflipped["caption"] == "the dog on the left of a cat ."
    assert _positive_tokens(
        tokenizer, unflipped["caption"], unflipped["instances"].gt_positive_map[1]
    ) == ["left"]
    no_swap = _mapper(tokenizer, augs=[T.HFlipTransform(80)], swap_left_right_on_flip=False)(record)
    assert no_swap["caption"] == "the dog on the left of a cat ."


def test_train_augmentations_keep_positive_maps_valid(tokenizer, tmp_path):
    big = _write_image(tmp_path / "big.png", width=400, height=300)
    record = _grounding_record(
        big,
        "a left hand . the right foot",
        [((10, 10, 390, 290), [[2, 11]]), ((200, 100, 220, 120), [[14, 28]])],
    )
    record["height"], record["width"] = 300, 400
    mapper = _mapper(tokenizer, build_train_augmentations(), thing_classes=None)
    np.random.seed(0)
    sizes, n_flipped = set(), 0
    for _ in range(30):
        out = mapper(record)
        h, w = out["image"].shape[1:]
        sizes.add(min(h, w))
        inst = out["instances"]
        assert min(h, w) in range(480, 801, 32) or max(h, w) == 1333
        boxes = inst.gt_boxes.tensor
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (boxes >= 0).all()
        for k, ((b, e),) in enumerate(out["tokens_positive"]):
            phrase = out["caption"][b:e]
            assert phrase in ("left hand", "right hand", "the right foot", "the left foot")
            assert inst.gt_positive_map[k].sum() > 0.99
        n_flipped += "right hand" in out["caption"]
    assert len(sizes) > 3 and 5 < n_flipped < 25
    test_out = _mapper(
        tokenizer, build_test_augmentations(800, 1333), is_train=False, thing_classes=None
    )(record)
    # The official test resize truncates: 800 * 400 / 300 = 1066.67 -> 1066.
    assert test_out["image"].shape[1:] == (800, 1066)


def test_eval_mode(tokenizer, image_file):
    out = _mapper(tokenizer, is_train=False)(_det_record(image_file, [((2, 3, 30, 40), 1)]))
    assert out["category_names"] == CLASSES
    assert "caption" not in out and "annotations" not in out and "instances" not in out
    rec = _grounding_record(image_file, "  The Red Car", [((2, 3, 30, 40), [[6, 13]])], task="rec")
    out = _mapper(tokenizer, is_train=False)(rec)
    assert out["caption"] == "the red car ." and out["task"] == "rec"
    assert out["gt_box"] == [2, 3, 30, 40]
    assert "annotations" not in out and "instances" not in out
    no_classes = _mapper(tokenizer, is_train=False, thing_classes=None)
    with pytest.raises(ValueError, match="without thing_classes"):
        no_classes(_det_record(image_file, []))


def test_rec_and_bad_records(tokenizer, image_file):
    rec = _grounding_record(
        image_file, "the man on the left", [((2, 3, 30, 40), [[0, 19]])], task="rec"
    )
    out = _mapper(tokenizer)(rec)
    assert out["instances"].gt_classes.tolist() == [0] and len(out["tokens_positive"]) == 1
    two = _grounding_record(
        image_file, "a man", [((2, 3, 30, 40), [[0, 5]]), ((5, 5, 9, 9), [[2, 5]])], task="rec"
    )
    with pytest.raises(ValueError, match="image_id=11.*exactly one"):
        _mapper(tokenizer)(two)
    outside = _grounding_record(image_file, "a man", [((2, 3, 30, 40), [[2, 9]])])
    with pytest.raises(ValueError, match=r"image_id=11.*\[2, 9\)"):
        _mapper(tokenizer)(outside)
    empty = _grounding_record(image_file, "  ", [])
    with pytest.raises(ValueError, match="image_id=11.*empty caption"):
        _mapper(tokenizer)(empty)
    bad_class = _det_record(image_file, [((2, 3, 30, 40), 99)])
    with pytest.raises(ValueError, match="image_id=7.*category_id 99"):
        _mapper(tokenizer)(bad_class)


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------
@pytest.fixture
def coco_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        _write_image(images / f"{i}.png")
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"{i}.png", "height": 60, "width": 80} for i in range(3)
        ],
        "categories": [
            {"id": 3, "name": "fish"},
            {"id": 1, "name": "starfish"},
            {"id": 9, "name": "jellyfish"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 9,
                "bbox": [2, 3, 20, 30],
                "area": 600,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [30, 3, 20, 30],
                "area": 600,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 3,
                "bbox": [5, 5, 10, 10],
                "area": 100,
                "iscrowd": 0,
            },
        ],
    }
    json_file = tmp_path / "annotations.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(images)


def test_register_odinw(tokenizer, coco_folder, tmp_path):
    json_file, image_root = coco_folder
    name = _unique("odinw")
    register_odinw(name, json_file, image_root)
    assert "thing_classes" not in MetadataCatalog.get(name).as_dict()  # lazy
    assert get_thing_classes(name) == ["starfish", "fish", "jellyfish"]
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3
    mapper = _mapper(tokenizer, thing_classes=get_thing_classes(name))
    out = mapper(dicts[0])
    names = out["caption"][:-2].split(" . ")
    assert sorted(names[c] for c in out["instances"].gt_classes.tolist()) == [
        "jellyfish",
        "starfish",
    ]

    missing = _unique("odinw_missing")
    register_odinw(missing, str(tmp_path / "nope.json"), image_root)  # no error until loaded
    with pytest.raises(FileNotFoundError, match="nope.json"):
        DatasetCatalog.get(missing)
    no_images = _unique("odinw_noimg")
    register_odinw(no_images, json_file, str(tmp_path / "no_images"))
    with pytest.raises(FileNotFoundError, match="no_images"):
        DatasetCatalog.get(no_images)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_register_odvg(tokenizer, tmp_path, coco_folder):
    _, image_root = coco_folder
    label_map = tmp_path / "label_map.json"
    label_map.write_text(json.dumps({"0": "person", "1": "cat", "10": "dog", "2": "car"}))
    od = _write_jsonl(
        tmp_path / "od.jsonl",
        [
            {
                "filename": "0.png",
                "height": 60,
                "width": 80,
                "detection": {
                    "instances": [{"bbox": [1, 2, 30, 40], "label": 10, "category": "dog"}]
                },
            },
            {"filename": "1.png", "height": 60, "width": 80, "detection": {"instances": []}},
        ],
    )
    name = _unique("odvg_od")
    register_odvg(name, od, image_root, label_map=str(label_map))
    dicts = DatasetCatalog.get(name)
    assert get_thing_classes(name) == ["person", "cat", "car", "dog"]
    assert dicts[0]["annotations"][0]["category_id"] == 3 and dicts[0]["image_id"] == 1
    out = _mapper(tokenizer, thing_classes=get_thing_classes(name))(dicts[0])
    assert out["caption"][:-2].split(" . ")[out["instances"].gt_classes[0]] == "dog"

    vg = _write_jsonl(
        tmp_path / "vg.jsonl",
        [
            {
                "filename": "2.png",
                "height": 60,
                "width": 80,
                "grounding": {
                    "caption": "A dog chasing a ball",
                    "regions": [
                        {"bbox": [1, 2, 30, 40], "phrase": "a dog", "tokens_positive": [[0, 5]]},
                        {"bbox": [40, 2, 50, 12], "phrase": "a ball"},
                    ],
                },
            },
        ],
    )
    name = _unique("odvg_vg")
    register_odvg(name, vg, image_root)
    (record,) = DatasetCatalog.get(name)
    assert record["annotations"][1]["tokens_positive"] == [[14, 20]]
    out = _mapper(tokenizer, thing_classes=None)(record)
    assert out["caption"] == "a dog chasing a ball ."
    assert _positive_tokens(tokenizer, out["caption"], out["instances"].gt_positive_map[1]) == [
        "a",
        "ball",
    ]

    bad = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {
                "filename": "2.png",
                "height": 60,
                "width": 80,
                "grounding": {"caption": "a dog", "regions": []},
            },
            {
                "filename": "2.png",
                "height": 60,
                "width": 80,
                "grounding": {
                    "caption": "a dog",
                    "regions": [{"bbox": [1, 2, 3, 4], "tokens_positive": [[0, 50]]}],
                },
            },
        ],
    )
    name = _unique("odvg_bad")
    register_odvg(name, bad, image_root)
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2.*\[0, 50\)"):
        DatasetCatalog.get(name)
    no_caption = _write_jsonl(
        tmp_path / "nocap.jsonl",
        [
            {"filename": "2.png", "height": 60, "width": 80, "grounding": {"regions": []}},
        ],
    )
    name = _unique("odvg_nocap")
    register_odvg(name, no_caption, image_root)
    with pytest.raises(ValueError, match="nocap.jsonl: line 1 has no caption"):
        DatasetCatalog.get(name)
    unknown = _write_jsonl(
        tmp_path / "unknown.jsonl",
        [
            {
                "filename": "0.png",
                "height": 60,
                "width": 80,
                "detection": {"instances": [{"bbox": [1, 2, 30, 40], "label": 7}]},
            },
        ],
    )
    name = _unique("odvg_unknown")
    register_odvg(name, unknown, image_root, label_map={"0": "a"})
    assert MetadataCatalog.get(name).thing_classes == ["a"]  # a dict label map: set at once
    with pytest.raises(ValueError, match="line 1: instance 0 has label '7'"):
        DatasetCatalog.get(name)


def _mdetr_json(tmp_path, images, annotations, name="final_refcoco_val.json"):
    path = tmp_path / name
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "object"}],
            }
        )
    )
    return str(path)


def test_mdetr_rec_and_flickr(tokenizer, tmp_path, coco_folder):
    _, image_root = coco_folder
    images = [
        {
            "id": 5,
            "file_name": "0.png",
            "height": 60,
            "width": 80,
            "caption": "Left zebra",
            "original_img_id": 123,
            "sentence_id": 0,
        },
        {"id": 6, "file_name": "1.png", "height": 60, "width": 80, "caption": "man in red"},
    ]
    annotations = [
        {
            "id": 1,
            "image_id": 5,
            "bbox": [2, 3, 20, 30],
            "tokens_positive": [[0, 10]],
            "category_id": 1,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 6,
            "bbox": [4, 4, 20, 20],
            "tokens_positive": [[0, 3]],
            "category_id": 1,
            "iscrowd": 0,
        },
    ]
    name = _unique("refcoco")
    register_mdetr(name, _mdetr_json(tmp_path, images, annotations), image_root, task="rec")
    dicts = DatasetCatalog.get(name)
    assert [d["task"] for d in dicts] == ["rec", "rec"] and dicts[0]["original_img_id"] == 123
    assert MetadataCatalog.get(name).evaluator_type == "rec"
    eval_out = _mapper(tokenizer, is_train=False)(dicts[0])
    assert eval_out["gt_box"] == [2, 3, 22, 33]  # xywh -> xyxy, original pixels
    assert dicts[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    out = _mapper(tokenizer, augs=[T.HFlipTransform(80)])(dicts[0])
    assert out["caption"] == "right zebra ."
    assert out["instances"].gt_boxes.tensor.tolist() == [[58.0, 3.0, 78.0, 33.0]]
    assert _positive_tokens(tokenizer, out["caption"], out["instances"].gt_positive_map[0]) == [
        "right",
        "zebra",
    ]

    two_boxes = annotations + [dict(annotations[1], id=3)]
    with pytest.raises(ValueError, match="image id 6 is a REC record with 2 boxes"):
        load_mdetr_json(_mdetr_json(tmp_path, images, two_boxes, "two.json"), image_root, "rec")
    no_caption = [dict(images[0]), {k: v for k, v in images[1].items() if k != "caption"}]
    with pytest.raises(ValueError, match="image id 6 has no caption"):
        load_mdetr_json(
            _mdetr_json(tmp_path, no_caption, annotations, "nocap.json"), image_root, "rec"
        )
    outside = [annotations[0], dict(annotations[1], tokens_positive=[[5, 40]])]
    with pytest.raises(ValueError, match=r"image id 6.*\[5, 40\)"):
        load_mdetr_json(_mdetr_json(tmp_path, images, outside, "outside.json"), image_root, "rec")
    with pytest.raises(FileNotFoundError, match="flickr30k-images"):
        load_mdetr_json(
            _mdetr_json(tmp_path, images, annotations), str(tmp_path / "flickr30k-images")
        )

    flickr_images = [
        {
            "id": 9,
            "file_name": "2.png",
            "height": 60,
            "width": 80,
            "caption": "A man and a dog and a man",
        }
    ]
    flickr_annotations = [
        {
            "id": 1,
            "image_id": 9,
            "bbox": [2, 3, 20, 30],
            "tokens_positive": [[0, 5]],
            "phrase_ids": 40,
        },
        {
            "id": 2,
            "image_id": 9,
            "bbox": [40, 3, 20, 30],
            "tokens_positive": [[10, 15]],
            "phrase_ids": 41,
        },
        {
            "id": 3,
            "image_id": 9,
            "bbox": [30, 30, 9, 9],
            "tokens_positive": [[0, 5]],
            "phrase_ids": 40,
        },
    ]
    flickr = load_mdetr_json(
        _mdetr_json(tmp_path, flickr_images, flickr_annotations, "flickr.json"), image_root
    )
    assert "task" not in flickr[0]
    out = _mapper(tokenizer)(flickr[0])
    assert out["instances"].gt_classes.tolist() == [0, 1, 0]  # phrase ids -> phrase index


def test_default_registration():
    from grounding_dino.data.datasets import MDETR_SPLITS

    names = set(DatasetCatalog.list())
    for name in [
        "lvis_v1_minival",
        "refcoco_testA",
        "refcoco+_val",
        "refcocog_test",
        "flickr30k_val",
        "objects365_train_odvg",
        "coco_2017_val",
        "lvis_v1_val",
        "mixed_train_no_coco",
    ]:
        assert name in names
    assert set(MDETR_SPLITS) <= names  # every split of the table is registered
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    assert MetadataCatalog.get("refcocog_val").json_file == os.path.join(
        root, "mdetr_annotations/final_refcocog_val.json"
    )
    assert len(MetadataCatalog.get("lvis_v1_minival").thing_classes) == 1203
    if not os.path.exists(MetadataCatalog.get("refcoco_val").json_file):
        with pytest.raises(FileNotFoundError, match="final_refcoco_val.json"):
            DatasetCatalog.get("refcoco_val")


def test_coco2odvg(tmp_path, coco_folder, tokenizer):
    json_file, image_root = coco_folder
    spec = importlib.util.spec_from_file_location(
        "coco2odvg", os.path.join(REPO, "datasets", "coco2odvg.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_file = tmp_path / "out" / "train_odvg.jsonl"
    assert module.main([json_file, str(out_file)]) == 0
    label_map = json.loads((tmp_path / "out" / "train_odvg_label_map.json").read_text())
    assert label_map == {"0": "starfish", "1": "fish", "2": "jellyfish"}
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 3 and lines[2]["detection"]["instances"] == []
    assert lines[0]["detection"]["instances"][0] == {
        "bbox": [2, 3, 22, 33],
        "label": 2,
        "category": "jellyfish",
    }

    name = _unique("converted")
    register_odvg(
        name,
        str(out_file),
        image_root,
        label_map=str(tmp_path / "out" / "train_odvg_label_map.json"),
    )
    converted = DatasetCatalog.get(name)
    coco_name = _unique("coco")
    register_odinw(coco_name, json_file, image_root)
    original = DatasetCatalog.get(coco_name)
    assert get_thing_classes(name) == get_thing_classes(coco_name)
    for a, b in zip(converted, original):
        boxes_a = [
            BoxMode.convert(x["bbox"], x["bbox_mode"], BoxMode.XYXY_ABS) for x in a["annotations"]
        ]
        boxes_b = [
            BoxMode.convert(x["bbox"], x["bbox_mode"], BoxMode.XYXY_ABS) for x in b["annotations"]
        ]
        assert np.allclose(boxes_a, boxes_b)
        assert [x["category_id"] for x in a["annotations"]] == [
            x["category_id"] for x in b["annotations"]
        ]
    with pytest.raises(SystemExit):
        module.main([str(tmp_path / "missing.json"), str(out_file)])


def test_lazy_config_and_pickle(tokenizer, minilm_dir, image_file):
    import pickle

    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    cfg = L(GroundingDatasetMapper)(
        is_train=True,
        augmentations=L(build_train_augmentations)(min_sizes=[64], max_size=100),
        tokenizer=minilm_dir,
        thing_classes=L(get_thing_classes)(name="coco_2017_train"),
        drop_warning_period=1000,
    )
    mapper = pickle.loads(pickle.dumps(instantiate(cfg)))
    assert len(mapper.thing_classes) == 80 and mapper.thing_classes[0] == "person"
    out = mapper(_det_record(image_file, [((2, 3, 30, 40), 0)]))
    assert min(out["image"].shape[1:]) <= 64 and max(out["image"].shape[1:]) <= 100
    assert out["instances"].gt_positive_map.shape == (1, 256)
    assert mapper.tokenizer is tokenizer  # reloaded through the cache after unpickling
    assert out["input_ids"] == tokenizer(out["caption"])["input_ids"]
