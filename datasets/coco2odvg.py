#!/usr/bin/env python
"""
Converts a COCO-format detection json to an ODVG jsonl file and its label map.

Categories are numbered 0..C-1 in the order of their COCO ids (the label map is
``{"0": "person", ...}``); boxes become [x1, y1, x2, y2]; crowd boxes are skipped unless
``--keep-crowd``. Images without boxes are kept (they train as negatives).

Example:
    python datasets/coco2odvg.py datasets/coco/annotations/instances_train2017.json \
        datasets/coco/annotations/coco2017_train_odvg.jsonl \
        --label-map datasets/coco/annotations/coco2017_label_map.json
"""

import argparse
import json
import os
import sys
from typing import Dict, Iterator, List, Tuple


def convert(coco: Dict, keep_crowd: bool = False) -> Tuple[Iterator[Dict], Dict[str, str]]:
    """
    Args:
        coco: a loaded COCO annotation dict (images, annotations, categories).
        keep_crowd: keep ``iscrowd`` boxes.

    Returns:
        (ODVG records, one per image, label map {str(label): name}).
    """
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"Input has no '{key}' list: is it a COCO detection json?")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    name_of = {c["id"]: c["name"] for c in categories}
    label_map = {str(i): c["name"] for i, c in enumerate(categories)}

    boxes_of: Dict[int, List[Dict]] = {}
    for anno in coco["annotations"]:
        if anno.get("iscrowd", 0) and not keep_crowd:
            continue
        if anno["category_id"] not in label_of:
            raise ValueError(
                f"Annotation {anno.get('id')!r} has category_id {anno['category_id']!r}, "
                "which is not in 'categories'"
            )
        x, y, w, h = anno["bbox"]
        boxes_of.setdefault(anno["image_id"], []).append(
            {
                "bbox": [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)],
                "label": label_of[anno["category_id"]],
                "category": name_of[anno["category_id"]],
            }
        )

    def records() -> Iterator[Dict]:
        for image in coco["images"]:
            yield {
                "filename": image["file_name"],
                "height": image["height"],
                "width": image["width"],
                "detection": {"instances": boxes_of.get(image["id"], [])},
            }

    return records(), label_map


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="COCO-format json (instances_*.json)")
    parser.add_argument("output", help="ODVG jsonl to write")
    parser.add_argument("--label-map", help="label map json to write (default: next to output)")
    parser.add_argument("--keep-crowd", action="store_true", help="keep iscrowd boxes")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.input):
        parser.error(f"input file {args.input} does not exist")
    with open(args.input) as f:
        coco = json.load(f)
    records, label_map = convert(coco, keep_crowd=args.keep_crowd)
    label_map_path = args.label_map or os.path.splitext(args.output)[0] + "_label_map.json"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    count = 0
    with open(args.output, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    with open(label_map_path, "w") as f:
        json.dump(label_map, f)
    print(f"Wrote {count} images to {args.output} and {len(label_map)} labels to {label_map_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
