"""
A user's own COCO-format detection dataset, registered from a config at instantiate time.

:func:`register_coco_format` is detectron2's ``register_coco_instances`` with the checks and
the naming a fine-tuning run needs: the annotation file and the image folder are checked when
the config is instantiated (a wrong path fails before training starts, naming the config key),
the category names are cleaned for prompts and can be renamed, and the metadata
(``thing_classes``, the id mapping, ``evaluator_type="coco"``) is set at registration, so the
mapper's classes and the evaluator need no loading first. It returns the dataset's name, so a
LazyConfig can use the call wherever a name goes; every process that instantiates the config
(each ``--num-gpus`` worker) registers the dataset itself::

    dataloader.train.dataset = L(get_detection_dataset_dicts)(
        names=L(register_coco_format)(name="pets_train", json_file=..., image_root=...)
    )

``configs/finetune_coco_format.py`` wires it to a top-level ``dataset`` node.
"""

import functools
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from ...text import clean_category_name

__all__ = ["register_coco_format", "coco_format_categories"]

logger = logging.getLogger(__name__)

# name -> (json_file, image_root, class_names) of the registrations made here: a second call
# with the same arguments (the config is instantiated again at every evaluation) is a no-op.
_REGISTERED: Dict[str, tuple] = {}


def _read_coco_json(json_file: Optional[str], json_key: str) -> Dict:
    """The parsed annotation file; errors name ``json_key`` and the path."""
    if not json_file:
        raise ValueError(
            f"{json_key} is not set: give the COCO-format annotation file, e.g. "
            f"{json_key}=path/to/annotations.json"
        )
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{json_key}={json_file}: no such file")
    if os.path.getsize(json_file) == 0:
        raise ValueError(f"{json_key}={json_file} is empty")
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_key}={json_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_key}={json_file} is not a COCO-format object (a {type(data)})")
    for field in ("images", "categories"):
        if not isinstance(data.get(field), list) or not data[field]:
            raise ValueError(
                f"{json_key}={json_file} has no {field!r}: a COCO-format file lists its "
                "images and categories"
            )
    return data


def _check_images(data: Dict, json_file: str, image_root: Optional[str], keys) -> None:
    """Every image the json lists is a file under ``image_root``."""
    json_key, images_key = keys
    if not image_root:
        raise ValueError(
            f"{images_key} is not set: give the folder of the images that {json_key} lists"
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{images_key}={image_root}: no such folder")
    if not os.listdir(image_root):
        raise ValueError(f"{images_key}={image_root} is empty")
    missing = [
        im.get("file_name")
        for im in data["images"]
        if not os.path.isfile(os.path.join(image_root, str(im.get("file_name"))))
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(data['images'])} images listed in "
            f"{json_key}={json_file} are not in {images_key}={image_root}, e.g. {missing[0]!r} "
            "(file_name is relative to the image folder)"
        )


def coco_format_categories(
    categories: Sequence[Dict],
    class_names: Optional[Sequence] = None,
    *,
    where: str = "the annotation file",
    class_names_key: str = "class_names",
) -> Dict[int, str]:
    """
    The prompt name of each category: the file's names, or ``class_names`` in the order of
    the category ids, cleaned with :func:`clean_category_name` ("traffic_light" -> "traffic
    light").

    Args:
        categories: the ``categories`` of a COCO-format file (``id``, ``name``).
        class_names: new names, one per category in increasing id order; None keeps the file's.
        where: names the file in error messages.
        class_names_key: names ``class_names`` in error messages (a config key).

    Returns:
        category id -> prompt name, in increasing id order.

    Raises:
        ValueError: a wrong count of ``class_names``, an empty name, or two categories with
            the same prompt name (the model could not tell them apart).
    """
    try:
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: every category needs an integer 'id' and a 'name'") from e
    if len(by_id) != len(categories):
        raise ValueError(f"{where}: category ids are not unique")
    ids = sorted(by_id)
    if class_names is None:
        raw = [by_id[i] for i in ids]
    else:
        raw = [n if isinstance(n, str) else str(n) for n in class_names]
        if len(raw) != len(ids):
            raise ValueError(
                f"{class_names_key} has {len(raw)} names but {where} has {len(ids)} categories "
                f"(ids {ids}, named {[by_id[i] for i in ids]}); give one name per category, in "
                "increasing id order"
            )
    names = [clean_category_name(n) for n in raw]
    empty = [ids[k] for k, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{class_names_key}: categories with ids {empty} get an empty name")
    seen: Dict[str, int] = {}
    for cat_id, name in zip(ids, names):
        if name.lower() in seen:
            raise ValueError(
                f"{where}: categories {seen[name.lower()]} and {cat_id} have the same prompt "
                f"name {name!r}; rename them with {class_names_key}=[...]"
            )
        seen[name.lower()] = cat_id
    return dict(zip(ids, names))


def _load_coco_format(json_file: str, image_root: str, name: str) -> List[Dict]:
    # No dataset name for load_coco_json: it would set thing_classes to the file's names,
    # which the metadata already holds (renamed). The ids are mapped here instead.
    dicts = load_coco_json(json_file, image_root)
    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    for record in dicts:
        for anno in record["annotations"]:
            if anno["category_id"] not in id_map:
                raise ValueError(
                    f"{json_file}: an annotation of image_id={record['image_id']} has "
                    f"category_id={anno['category_id']}, not among the file's category ids "
                    f"{sorted(id_map)}"
                )
            anno["category_id"] = id_map[anno["category_id"]]
    return dicts


def register_coco_format(
    name: str,
    json_file: Optional[str],
    image_root: Optional[str],
    class_names: Optional[Sequence] = None,
    *,
    json_key: str = "json_file",
    images_key: str = "image_root",
    class_names_key: str = "class_names",
) -> str:
    """
    Registers a COCO-format detection dataset (checked now, loaded when used) and returns
    its name. Calling it again with the same arguments does nothing.

    Args:
        name: the dataset name in detectron2's catalogs (e.g. ``"my_dataset_train"``).
        json_file: the COCO-format annotation file (``images``, ``annotations``,
            ``categories``).
        image_root: the folder that the images' ``file_name`` are relative to.
        class_names: prompt names for the categories, one per category in increasing id
            order (``["pothole", "crack"]`` for ids 1 and 2 named "cls_1", "cls_2"); None:
            the file's names. Either way the names are cleaned for prompts.
        json_key, images_key, class_names_key: the config keys of the three values, used in
            error messages (``"dataset.train_json"``...).

    Returns:
        ``name``. Its metadata holds ``thing_classes`` (the prompt names, which the mapper
        prompts with and the AP table shows), ``thing_dataset_id_to_contiguous_id``,
        ``json_file``, ``image_root`` and ``evaluator_type="coco"``.

    Raises:
        ValueError / FileNotFoundError: an unset, missing or empty file or folder, images
            missing from the folder, bad class names (see :func:`coco_format_categories`), or
            ``name`` already registered for another dataset.
    """
    key = (json_file, image_root, None if class_names is None else tuple(class_names))
    if _REGISTERED.get(name) == key:
        return name
    if name in _REGISTERED or name in DatasetCatalog.list():
        raise ValueError(
            f"Dataset {name!r} is already registered with other files or names; give this "
            "dataset another name"
        )
    data = _read_coco_json(json_file, json_key)
    _check_images(data, json_file, image_root, (json_key, images_key))
    names = coco_format_categories(
        data["categories"],
        class_names,
        where=f"{json_key}={json_file}",
        class_names_key=class_names_key,
    )
    raw = {int(c["id"]): c["name"] for c in data["categories"]}
    counts = {cat_id: 0 for cat_id in names}
    for anno in data.get("annotations", []):
        if anno.get("category_id") in counts:
            counts[anno["category_id"]] += 1
    DatasetCatalog.register(name, functools.partial(_load_coco_format, json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=list(names.values()),
        thing_dataset_id_to_contiguous_id={cat_id: i for i, cat_id in enumerate(names)},
    )
    _REGISTERED[name] = key
    table = ", ".join(
        f"{cat_id}: {raw[cat_id]!r}"
        + (f" -> {prompt!r}" if prompt != raw[cat_id] else "")
        + f" ({counts[cat_id]} boxes)"
        for cat_id, prompt in names.items()
    )
    logger.info(
        f"Registered {name!r}: {len(data['images'])} images, "
        f"{len(data.get('annotations', []))} boxes from {json_file}; categories {table}"
    )
    unused = [raw[cat_id] for cat_id, n in counts.items() if n == 0]
    if unused:
        logger.warning(
            f"{json_key}={json_file}: categories {unused} have no boxes; they stay in the "
            "prompt (as negatives in training)"
        )
    return name
