"""
The ODinW benchmark suites (Object Detection in the Wild, GLIP's ODinW-13 and ODinW-35).

Each dataset is a COCO-format folder as GLIP distributes ODinW (``odinw/<dataset>/...``): the
evaluation split is the one GLIP's configs test on (``valid``, or ``mini_val`` for the large
sets), with its ``annotations_without_background.json`` (the Roboflow super-category removed).
The names are GLIP's config names (``configs/odinw_35/<name>.yaml``); ODinW-35 includes the 13.
"""

import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco_format import register_odinw

__all__ = ["ODINW_DATASETS", "ODINW_SUITES", "OdinwSuite", "register_odinw_suite"]

logger = logging.getLogger(__name__)

_ANNOTATIONS = "annotations_without_background.json"


def _split(folder: str, split: str = "valid") -> Tuple[str, str]:
    """(annotation file, image folder) of a Roboflow-style split folder."""
    return f"{folder}/{split}/{_ANNOTATIONS}", f"{folder}/{split}"


def _export(folder: str) -> Tuple[str, str]:
    """(annotation file, image folder) of an "export" folder holding all splits."""
    return f"{folder}/val_{_ANNOTATIONS}", folder


# GLIP's config name -> (annotation file, image folder), relative to the ODinW root (the folder
# GLIP calls ``odinw/``), for the split GLIP evaluates (DATASETS.TEST of its configs).
ODINW_DATASETS: Dict[str, Tuple[str, str]] = {
    "AerialMaritimeDrone_large": _split("AerialMaritimeDrone/large"),
    "AerialMaritimeDrone_tiled": _split("AerialMaritimeDrone/tiled"),
    "AmericanSignLanguageLetters_American_Sign_Language_Letters.v1-v1.coco": _split(
        "AmericanSignLanguageLetters/American Sign Language Letters.v1-v1.coco"
    ),
    "Aquarium_Aquarium_Combined.v2-raw-1024.coco": _split(
        "Aquarium/Aquarium Combined.v2-raw-1024.coco"
    ),
    "BCCD_BCCD.v3-raw.coco": _split("BCCD/BCCD.v3-raw.coco"),
    "ChessPieces_Chess_Pieces.v23-raw.coco": _split("ChessPieces/Chess Pieces.v23-raw.coco"),
    "CottontailRabbits": _split("CottontailRabbits"),
    "DroneControl_Drone_Control.v3-raw.coco": _split(
        "DroneControl/Drone Control.v3-raw.coco", "mini_val"
    ),
    "EgoHands_generic": _split("EgoHands/generic", "mini_val"),
    "EgoHands_specific": _split("EgoHands/specific", "mini_val"),
    "HardHatWorkers_raw": _split("HardHatWorkers/raw"),
    "MaskWearing_raw": _split("MaskWearing/raw"),
    "MountainDewCommercial": _split("MountainDewCommercial"),
    "NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco": _split(
        "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco"
    ),
    "OxfordPets_by-breed": _split("OxfordPets/by-breed", "mini_val"),
    "OxfordPets_by-species": _split("OxfordPets/by-species", "mini_val"),
    "PKLot_640": _split("PKLot/640", "mini_val"),
    "Packages_Raw": _split("Packages/Raw"),
    "PascalVOC": _split("PascalVOC"),
    "Raccoon_Raccoon.v2-raw.coco": _split("Raccoon/Raccoon.v2-raw.coco"),
    "ShellfishOpenImages_raw": _split("ShellfishOpenImages/raw"),
    "ThermalCheetah": _split("ThermalCheetah"),
    "UnoCards_raw": _split("UnoCards/raw", "mini_val"),
    "VehiclesOpenImages_416x416": _split("VehiclesOpenImages/416x416", "mini_val"),
    "WildfireSmoke": _split("WildfireSmoke"),
    "boggleBoards_416x416AutoOrient_export_": _export("boggleBoards/416x416AutoOrient/export"),
    "brackishUnderwater_960x540": _split("brackishUnderwater/960x540", "mini_val"),
    "dice_mediumColor_export": _export("dice/mediumColor/export"),
    "openPoetryVision_512x512": _split("openPoetryVision/512x512", "mini_val"),
    "pistols_export": _export("pistols/export"),
    "plantdoc_416x416": _split("plantdoc/416x416"),
    "pothole": _split("pothole"),
    "selfdrivingCar_fixedLarge_export_": _export("selfdrivingCar/fixedLarge/export"),
    "thermalDogsAndPeople": _split("thermalDogsAndPeople"),
    "websiteScreenshots": _split("websiteScreenshots", "mini_val"),
}

# The suites, as GLIP's configs/odinw_13 and configs/odinw_35/_all.json list them.
ODINW_SUITES: Dict[str, Tuple[str, ...]] = {
    "odinw13": (
        "AerialMaritimeDrone_large",
        "Aquarium_Aquarium_Combined.v2-raw-1024.coco",
        "CottontailRabbits",
        "EgoHands_generic",
        "NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco",
        "Packages_Raw",
        "PascalVOC",
        "pistols_export",
        "pothole",
        "Raccoon_Raccoon.v2-raw.coco",
        "ShellfishOpenImages_raw",
        "thermalDogsAndPeople",
        "VehiclesOpenImages_416x416",
    ),
    "odinw35": tuple(ODINW_DATASETS),
}

_PREFIX = "odinw_"


class OdinwSuite(NamedTuple):
    """What :func:`register_odinw_suite` found.

    Attributes:
        registered: detectron2 names of the datasets found on disk (``odinw_<config name>``),
            in suite order.
        missing: ``{detectron2 name: "<path> does not exist"}`` for the others (not registered).
    """

    registered: List[str]
    missing: Dict[str, str]


def _select(which: str, datasets: Optional[Sequence[str]]) -> List[str]:
    if which not in ODINW_SUITES:
        raise ValueError(f"Unknown ODinW suite {which!r}; choose one of {sorted(ODINW_SUITES)}")
    suite = ODINW_SUITES[which]
    if datasets is None:
        return list(suite)
    chosen = []
    for name in datasets:
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if key not in suite:
            raise ValueError(
                f"{name!r} is not a dataset of {which}; its datasets are: {', '.join(suite)}"
            )
        chosen.append(key)
    return chosen


def register_odinw_suite(
    root: str, which: str = "odinw13", datasets: Optional[Sequence[str]] = None
) -> OdinwSuite:
    """
    Registers the datasets of an ODinW suite found under ``root`` as COCO-format detection
    datasets (evaluated with COCO AP, ``thing_classes`` from each annotation file), named
    ``odinw_<GLIP config name>`` (e.g. ``odinw_pothole``).

    Args:
        root: the ODinW folder (GLIP's ``odinw/``: ``root/pothole/valid/...``).
        which: "odinw13" or "odinw35".
        datasets: only these datasets of the suite (config names, with or without the
            ``odinw_`` prefix); None: all.

    Returns:
        :class:`OdinwSuite`: the names registered and the missing datasets with the path that
        was not found. A missing dataset is logged, never silently dropped.

    Raises:
        ValueError: an unknown suite or dataset, or a name already registered to another file.
    """
    root = os.path.expanduser(root)
    registered, missing = [], {}
    for key in _select(which, datasets):
        json_rel, image_rel = ODINW_DATASETS[key]
        json_file, image_root = os.path.join(root, json_rel), os.path.join(root, image_rel)
        name = _PREFIX + key
        absent = [
            p for p, ok in ((json_file, os.path.isfile), (image_root, os.path.isdir)) if not ok(p)
        ]
        if absent:
            missing[name] = f"{absent[0]} does not exist"
            continue
        _register(name, json_file, image_root)
        registered.append(name)
    if missing:
        logger.warning(
            f"{len(missing)} of the {len(registered) + len(missing)} requested {which} datasets "
            f"are missing under {root}:\n"
            + "\n".join(f"  {name}: {why}" for name, why in missing.items())
        )
    return OdinwSuite(registered, missing)


def _register(name: str, json_file: str, image_root: str) -> None:
    """Registers one dataset; a name this function registered before is re-registered."""
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        if metadata.get("json_file") == json_file and metadata.get("image_root") == image_root:
            return
        if not metadata.get("odinw_suite", False):
            raise ValueError(
                f"Dataset name {name!r} is already registered to {metadata.get('json_file')}; "
                "remove it from DatasetCatalog and MetadataCatalog first"
            )
        logger.info(f"Re-registering {name} from {json_file}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_odinw(name, json_file, image_root)
    MetadataCatalog.get(name).set(odinw_suite=True)
