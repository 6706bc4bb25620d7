"""Tests of the synthetic shapes datasets (grounding_dino.data.synthetic and .data.shapes)."""

import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from grounding_dino.data import synthetic
from grounding_dino.data.shapes import drawing, sampling, splits
from grounding_dino.data.synthetic import (
    SHAPES_DIR_ENV,
    ShapesConfig,
    generate_shapes_split,
    load_shapes_grounding,
    load_shapes_rec,
    load_shapes_scenes,
    register_shapes_datasets,
    render_scene,
    resolve_expression,
    shape_pairs,
)

SIZE = 128
TINY = dict(num_train=16, num_val=8, num_val_unseen=8, image_size=SIZE, seed=3)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """One tiny generated copy of every split, shared by the read-only tests."""
    root = str(tmp_path_factory.mktemp("shapes"))
    config = ShapesConfig(**TINY)
    dirs = {
        split: generate_shapes_split(config, split, root) for split in synthetic.DETECTION_SPLITS
    }
    return config, dirs


def _pair(obj):
    return f"{obj['color']} {obj['shape']}"


def test_same_seed_same_dicts_and_pixels(tmp_path, shapes_root):
    config, dirs = shapes_root
    other = generate_shapes_split(config, "train", str(tmp_path))
    assert load_shapes_scenes(other)["images"] == load_shapes_scenes(dirs["train"])["images"]
    for name in sorted(os.listdir(os.path.join(other, "images"))):
        a = cv2.imread(os.path.join(other, "images", name))
        b = cv2.imread(os.path.join(dirs["train"], "images", name))
        assert np.array_equal(a, b), name
    assert load_shapes_rec(other) == [
        {**d, "file_name": d["file_name"].replace(dirs["train"], other)}
        for d in load_shapes_rec(dirs["train"])
    ]
    # A different seed gives different scenes (and a different cache folder).
    reseeded = ShapesConfig(**{**TINY, "seed": 4})
    assert reseeded.split_key("train") != config.split_key("train")
    scene0 = splits.generate_scene(reseeded, "train", 0)
    assert scene0["objects"] != load_shapes_scenes(dirs["train"])["images"][0]["objects"]


def test_image_depends_only_on_seed_and_index():
    small = ShapesConfig(**{**TINY, "num_train": 2})
    assert splits.generate_scene(small, "train", 1) == splits.generate_scene(
        ShapesConfig(**TINY), "train", 1
    )


def test_boxes_inside_and_tight_around_drawn_shapes(shapes_root):
    config, dirs = shapes_root
    for split_dir in dirs.values():
        for scene in load_shapes_scenes(split_dir)["images"]:
            image = cv2.imread(os.path.join(split_dir, "images", scene["file_name"]))[:, :, ::-1]
            rendered, masks = render_scene(scene)
            assert np.array_equal(rendered, image), "stored PNG differs from the scene"
            assert 1 <= len(scene["objects"]) <= config.max_objects
            background, _ = render_scene({**scene, "objects": []})
            # Pixels the shapes visibly change (faint anti-aliasing at sharp tips is ignored).
            changed = np.abs(image.astype(int) - background.astype(int)).sum(axis=2) > 20
            covered = np.zeros_like(changed)
            for obj, mask in zip(scene["objects"], masks):
                x, y, w, h = obj["bbox"]
                assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w > 0 and h > 0
                assert obj["bbox"] == drawing.mask_box(mask)
                assert (
                    obj["area"]
                    == mask.sum()
                    >= 0.5 * sampling.MIN_VISIBLE * np.pi * (obj["radius"] * 0.45) ** 2
                )
                x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
                covered[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
                # The drawn pixels have the object's colour, and within 1 px of each side of the
                # box some pixel has that colour (the box is tight up to anti-aliasing).
                near = np.abs(image.astype(int) - np.asarray(obj["rgb"])).max(axis=2) < 40
                assert np.median(image[mask], axis=0).tolist() == pytest.approx(obj["rgb"], abs=20)
                assert near[y0 : y0 + 2, x0:x1].any() and near[y1 - 2 : y1, x0:x1].any()
                assert near[y0:y1, x0 : x0 + 2].any() and near[y0:y1, x1 - 2 : x1].any()
            # Nothing is drawn outside the boxes (1 px of anti-aliasing allowed).
            assert not (changed & ~covered).any()


def test_unseen_pairs_never_in_training(shapes_root):
    config, dirs = shapes_root
    seen, unseen = config.pairs()
    assert len(unseen) == round(0.2 * len(seen + unseen)) and not set(seen) & set(unseen)
    # Every colour and shape still appears in some seen pair.
    assert {p.split()[0] for p in seen} == set(config.colors)
    assert {p.split()[1] for p in seen} == set(config.shapes)
    train = load_shapes_scenes(dirs["train"])
    assert train["classes"] == seen
    assert all(_pair(o) in seen for s in train["images"] for o in s["objects"])
    assert all(
        _pair(o) in seen for s in load_shapes_scenes(dirs["val"])["images"] for o in s["objects"]
    )
    unseen_scenes = load_shapes_scenes(dirs["val_unseen"])["images"]
    for scene in unseen_scenes:
        annotated = [o for o in scene["objects"] if o["annotated"]]
        assert annotated and all(_pair(o) in unseen for o in annotated)
        assert all(_pair(o) in seen for o in scene["objects"] if not o["annotated"])
    coco = COCO(os.path.join(dirs["val_unseen"], "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == unseen
    assert len(coco.getAnnIds()) == sum(o["annotated"] for s in unseen_scenes for o in s["objects"])


def test_shape_pairs_explicit_and_bad_input():
    seen, unseen = shape_pairs(("red", "blue"), ("circle", "star"), unseen_pairs=["blue star"])
    assert unseen == ["blue star"] and seen == ["red circle", "red star", "blue circle"]
    with pytest.raises(ValueError, match="magenta"):
        ShapesConfig(colors=("red", "magenta"))
    with pytest.raises(ValueError, match="red blob"):
        shape_pairs(("red",), ("circle",), unseen_pairs=["red blob"])
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=16)
    with pytest.raises(ValueError, match="Cannot parse"):
        resolve_expression("a big dog", [], SIZE)


def _obj(color, shape, size, cx, cy, r=10.0):
    return {"color": color, "shape": shape, "size": size, "bbox": [cx - r, cy - r, 2 * r, 2 * r]}


def test_resolve_expression_on_hand_made_scene():
    objects = [
        _obj("red", "circle", "small", 20, 60),
        _obj("red", "circle", "large", 100, 60),
        _obj("blue", "star", "small", 100, 110),
        _obj("red", "square", "small", 22, 100),
    ]
    assert resolve_expression("the red circle", objects, SIZE) == [0, 1]
    assert resolve_expression("the large red circle", objects, SIZE) == [1]
    assert resolve_expression("the leftmost circle", objects, SIZE, strict=True) == [0]
    assert resolve_expression("the red shape above the star", objects, SIZE, strict=True) == [1]
    assert resolve_expression("the small shape above the square", objects, SIZE) == [0]
    # Object 0 is only 2 px left of object 3: "leftmost red shape" is ambiguous.
    assert resolve_expression("the leftmost red shape", objects, SIZE) == [0, 3]
    assert resolve_expression("the leftmost red shape", objects, SIZE, strict=True) == []
    # The reference "circle" is not unique, so a relation to it means nothing clearly.
    assert resolve_expression("the star below the circle", objects, SIZE, strict=True) == []


def _check_expression(expression, objects, target, image_size):
    """Independent check: the words describe the target, and no other object fits them."""
    margin = synthetic.SPATIAL_MARGIN * image_size
    words = expression.split()
    assert words[0] == "the"
    relation = next((r for r in synthetic.RELATIONS if f" {r} the " in expression), None)
    head = expression.split(f" {relation} the ")[0] if relation else expression
    obj = objects[target]

    def fits(o, phrase_words):
        return all(
            w not in vocab or w == o[key]
            for w in phrase_words
            for key, vocab in (
                ("color", synthetic.COLOR_RGB),
                ("shape", synthetic.SHAPES),
                ("size", ("small", "large")),
            )
        )

    assert fits(obj, head.split()), f"'{expression}' does not describe {obj}"
    assert head.split()[-1] in synthetic.SHAPES + ("shape",)
    centers = [(o["bbox"][0] + o["bbox"][2] / 2, o["bbox"][1] + o["bbox"][3] / 2) for o in objects]
    rivals = [i for i, o in enumerate(objects) if i != target and fits(o, head.split())]
    superlative = words[1] if words[1] in synthetic.SUPERLATIVES else None
    if relation:
        ref_words = expression.split(f" {relation} the ")[1].split()
        refs = [i for i, o in enumerate(objects) if fits(o, ref_words)]
        assert len(refs) == 1 and refs[0] != target
        axis, sign = {"to the left of": (0, -1), "to the right of": (0, 1)}.get(
            relation, (1, -1 if relation == "above" else 1)
        )
        ref_center = centers[refs[0]]
        assert sign * (centers[target][axis] - ref_center[axis]) >= margin
        for i in rivals:  # no rival is even loosely on that side of the reference
            assert sign * (centers[i][axis] - ref_center[axis]) <= 0 or abs(
                centers[i][1 - axis] - ref_center[1 - axis]
            ) > 2 * sign * (centers[i][axis] - ref_center[axis])
    elif superlative:
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1)}.get(
            superlative, (1, -1)
        )
        assert rivals, f"'{expression}': a superlative over a single object"
        for i in rivals:
            assert sign * (centers[i][axis] - centers[target][axis]) >= margin
    else:
        assert not rivals, f"'{expression}' also fits objects {rivals}"


def test_rec_expressions_unique_and_describe_their_box(shapes_root):
    config, dirs = shapes_root
    kinds = set()
    for split in ("train", "val"):
        data = load_shapes_scenes(dirs[split])
        scenes = {s["file_name"]: s for s in data["images"]}
        dicts = load_shapes_rec(dirs[split])
        assert len(dicts) >= len(scenes)
        assert len({d["image_id"] for d in dicts}) == len(dicts)
        for d in dicts:
            assert d["task"] == "rec" and len(d["annotations"]) == 1
            ann = d["annotations"][0]
            assert ann["tokens_positive"] == [[0, len(d["caption"])]] and ann["phrase_id"] == 0
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            scene = scenes[os.path.basename(d["file_name"])]
            targets = [i for i, o in enumerate(scene["objects"]) if o["bbox"] == ann["bbox"]]
            assert len(targets) == 1
            target = targets[0]
            expression = d["caption"]
            assert resolve_expression(expression, scene["objects"], SIZE) == [target]
            assert resolve_expression(expression, scene["objects"], SIZE, strict=True) == [target]
            _check_expression(expression, scene["objects"], target, SIZE)
            assert data["classes"][ann["category_id"]] == _pair(scene["objects"][target])
            kinds.add("relation" if " the " in expression[4:] else expression.split()[1])
    assert "relation" in kinds and kinds & set(synthetic.SUPERLATIVES)


def test_grounding_records_join_one_checked_expression_per_object(shapes_root):
    config, dirs = shapes_root
    data = load_shapes_scenes(dirs["train"])
    scenes = {s["file_name"]: s for s in data["images"]}
    dicts = load_shapes_grounding(dirs["train"], variants=2, seed=config.seed)
    assert os.path.isfile(os.path.join(dirs["train"], f"grounding-2x-seed{config.seed}.json"))
    assert len({d["file_name"] for d in dicts}) == len(scenes)  # every image has some
    assert len({d["image_id"] for d in dicts}) == len(dicts)
    assert len(dicts) <= 2 * len(scenes)
    phrases_per_record, kinds = [], set()
    for d in dicts:
        assert "task" not in d  # a grounding record, not REC
        scene = scenes[os.path.basename(d["file_name"])]
        objects = scene["objects"]
        phrases = d["caption"].split(" . ")
        assert len(phrases) == len(d["annotations"])
        phrases_per_record.append(len(phrases))
        targets = []
        for phrase_id, (phrase, ann) in enumerate(zip(phrases, d["annotations"])):
            ((begin, end),) = ann["tokens_positive"]
            assert d["caption"][begin:end] == phrase and ann["phrase_id"] == phrase_id
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            target = [i for i, o in enumerate(objects) if o["bbox"] == ann["bbox"]]
            assert len(target) == 1
            assert resolve_expression(phrase, objects, SIZE, strict=True) == target
            _check_expression(phrase, objects, target[0], SIZE)
            assert data["classes"][ann["category_id"]] == _pair(objects[target[0]])
            targets += target
            kinds.add("relation" if " the " in phrase[4:] else phrase.split()[1])
        assert len(set(targets)) == len(targets)  # one expression per object
    assert max(phrases_per_record) >= 3
    assert "relation" in kinds and kinds & set(synthetic.SUPERLATIVES)
    # The cache gives the same records; the variants differ.
    assert load_shapes_grounding(dirs["train"], variants=2, seed=config.seed) == dicts
    assert any(a["caption"] != b["caption"] for a, b in zip(dicts[::2], dicts[1::2]))
    with pytest.raises(ValueError, match="variants must be >= 1"):
        load_shapes_grounding(dirs["train"], variants=0)


def test_expression_generator_on_many_scenes():
    config = ShapesConfig(**{**TINY, "refs_per_image": 5})
    count = 0
    for index in range(40):
        scene = splits.generate_scene(config, "train", index)
        for ref in scene["refs"]:
            _check_expression(ref["expression"], scene["objects"], ref["target"], SIZE)
            count += 1
    assert count >= 40


def test_registration_twice_and_coco_json(tmp_path):
    names = register_shapes_datasets(str(tmp_path / "a"), 6, 4, SIZE, prefix="tshapes", seed=1)
    splits_ = ("train", "val", "val_unseen", "rec_train", "rec_val", "grounding_train")
    expected = {f"tshapes_{s}" for s in splits_}
    assert set(names) == expected
    again = register_shapes_datasets(str(tmp_path / "b"), 6, 4, SIZE, prefix="tshapes", seed=1)
    assert all(again[n].startswith(str(tmp_path / "b")) for n in expected)
    for name in expected:
        meta = MetadataCatalog.get(name)
        dicts = DatasetCatalog.get(name)
        assert dicts and all(os.path.isfile(d["file_name"]) for d in dicts)
        if name.endswith("grounding_train"):  # training only: captions, no evaluator
            assert "evaluator_type" not in meta.as_dict()
            assert all(d["caption"] and "task" not in d for d in dicts)
            continue
        assert meta.evaluator_type == ("rec" if "rec" in name else "coco")
        if meta.evaluator_type == "coco":
            assert meta.json_file.startswith(str(tmp_path / "b"))
            coco = COCO(meta.json_file)
            assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == meta.thing_classes
            assert len(coco.getImgIds()) == len(dicts)
            assert len(coco.getAnnIds()) == sum(len(d["annotations"]) for d in dicts)
            for d in dicts:
                assert "caption" not in d and "image_id" in d
                for ann in d["annotations"]:
                    assert 0 <= ann["category_id"] < len(meta.thing_classes)
        else:
            assert all(d["task"] == "rec" and d["caption"] for d in dicts)
    seen, unseen = ShapesConfig().pairs()
    assert MetadataCatalog.get("tshapes_train").thing_classes == seen
    assert MetadataCatalog.get("tshapes_val_unseen").thing_classes == unseen
    assert MetadataCatalog.get("tshapes_rec_val").thing_classes == seen


def test_cache_reused_and_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv(SHAPES_DIR_ENV, str(tmp_path / "env"))
    config = ShapesConfig(**{**TINY, "num_val": 3})
    split_dir = generate_shapes_split(config, "val")
    assert (
        split_dir.startswith(str(tmp_path / "env")) and len(os.listdir(split_dir + "/images")) == 3
    )
    with open(os.path.join(split_dir, "coco.json")) as f:
        assert len(json.load(f)["images"]) == 3

    def fail(*args):
        raise AssertionError("a complete split was generated again")

    monkeypatch.setattr(splits, "render_scene", fail)
    assert generate_shapes_split(config, "val") == split_dir
    # Without the variable, the default folder is output/demo/shapes under the working dir.
    monkeypatch.delenv(SHAPES_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    assert splits.split_folder(config, "val", None).startswith(
        str(tmp_path / "output" / "demo" / "shapes")
    )


def test_generate_shapes_tool_writes_every_split(tmp_path):
    """``tools/generate_shapes.py``, run as a user runs it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(repo, "tools", "generate_shapes.py")]
    args = ["--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "64"]
    run = subprocess.run(command + args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = dict(re.findall(r"^(shapes_\w+): (\d+) records in ", run.stdout, re.MULTILINE))
    images = {}
    for split in ("train", "val", "val_unseen"):
        (folder,) = [f for f in os.listdir(tmp_path) if re.fullmatch(rf"{split}-[0-9a-f]+", f)]
        images[split] = len(os.listdir(os.path.join(tmp_path, folder, "images")))
        refs = [s["refs"] for s in load_shapes_scenes(os.path.join(tmp_path, folder))["images"]]
        if split != "val_unseen":
            assert int(printed[f"shapes_rec_{split}"]) == sum(map(len, refs))
    assert images == {"train": 3, "val": 2, "val_unseen": 2}
    assert 1 <= int(printed.pop("shapes_grounding_train")) <= 2 * 3  # two captions an image
    assert {k: int(v) for k, v in printed.items() if "rec" not in k} == {
        "shapes_train": 3,
        "shapes_val": 2,
        "shapes_val_unseen": 2,
    }
    bad = subprocess.run(command + ["--num-train", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--num-train must be >= 1" in bad.stderr


def test_coco_segmentation_is_the_drawn_mask(shapes_root):
    """coco.json's RLE segmentations decode (pycocotools) to render_scene's visible masks;
    ``area`` and ``bbox`` are those masks' pixel count and tight box; detectron2's dicts carry
    them."""
    config, dirs = shapes_root
    scenes = load_shapes_scenes(dirs["val"])["images"]
    coco = COCO(os.path.join(dirs["val"], "coco.json"))
    checked = 0
    for scene in scenes:
        _, masks = render_scene(scene)
        annotated = [m for o, m in zip(scene["objects"], masks) if o["annotated"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=scene["id"]))
        assert len(anns) == len(annotated)
        for ann, mask in zip(anns, annotated):
            decoded = coco.annToMask(ann).astype(bool)
            assert decoded.shape == (SIZE, SIZE) and np.array_equal(decoded, mask)
            assert ann["area"] == mask.sum() and ann["bbox"] == drawing.mask_box(mask)
            checked += 1
    assert checked > 0
    register_shapes_datasets(root=os.path.dirname(dirs["val"]), **TINY)
    record = DatasetCatalog.get("shapes_val")[0]
    assert all(isinstance(a["segmentation"], dict) for a in record["annotations"])
