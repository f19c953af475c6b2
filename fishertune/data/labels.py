"""Label definitions: the 19 Cityscapes train classes and every data set's mapping onto them.

All benchmarks score the 19 Cityscapes train classes (train ids 0..18, 255 = ignore; DESIGN
section 4). GTAV labels hold Cityscapes *label ids*, mapped by :data:`CITYSCAPES_ID_TO_TRAIN_ID`;
Mapillary Vistas v1.2 labels hold indices into the ``labels`` list of its ``config_v1.2.json``,
mapped by name with :func:`mapillary_to_train_id`; Cityscapes, BDD100K and ACDC labels already
hold train ids.
"""

from __future__ import annotations

import numpy as np

from fishertune.errors import UserError

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255

#: The standard Cityscapes colours of the 19 train classes, one RGB row per train id.
PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)


def colourize(label: np.ndarray) -> np.ndarray:
    """``H x W`` train ids -> ``H x W x 3`` uint8 in the Cityscapes palette; 255 (ignore) and any id
    outside 0..18 black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    lut[IGNORE_INDEX] = 0
    return lut[np.asarray(label, dtype=np.uint8)]


#: Cityscapes label id of each train id (cityscapesscripts ``labels.py``).
TRAIN_ID_TO_CITYSCAPES_ID = np.array(
    [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], dtype=np.uint8
)


def _lookup_table(pairs: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table that maps the keys of ``pairs`` to their values, the rest to 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


#: Cityscapes label id -> train id (GTAV labels hold label ids); every other value -> 255.
CITYSCAPES_ID_TO_TRAIN_ID = _lookup_table(
    {int(label_id): train_id for train_id, label_id in enumerate(TRAIN_ID_TO_CITYSCAPES_ID)}
)

# Mapillary Vistas v1.2: the 66 labels of the official config_v1.2.json in their official order,
# as (name, readable, colour, instances). "evaluate" is true for all but void--unlabeled.
MAPILLARY_V12_LABELS: tuple[tuple[str, str, tuple[int, int, int], bool], ...] = (
    ("animal--bird", "Bird", (165, 42, 42), True),
    ("animal--ground-animal", "Ground Animal", (0, 192, 0), True),
    ("construction--barrier--curb", "Curb", (196, 196, 196), False),
    ("construction--barrier--fence", "Fence", (190, 153, 153), False),
    ("construction--barrier--guard-rail", "Guard Rail", (180, 165, 180), False),
    ("construction--barrier--other-barrier", "Barrier", (90, 120, 150), False),
    ("construction--barrier--wall", "Wall", (102, 102, 156), False),
    ("construction--flat--bike-lane", "Bike Lane", (128, 64, 255), False),
    ("construction--flat--crosswalk-plain", "Crosswalk - Plain", (140, 140, 200), True),
    ("construction--flat--curb-cut", "Curb Cut", (170, 170, 170), False),
    ("construction--flat--parking", "Parking", (250, 170, 160), False),
    ("construction--flat--pedestrian-area", "Pedestrian Area", (96, 96, 96), False),
    ("construction--flat--rail-track", "Rail Track", (230, 150, 140), False),
    ("construction--flat--road", "Road", (128, 64, 128), False),
    ("construction--flat--service-lane", "Service Lane", (110, 110, 110), False),
    ("construction--flat--sidewalk", "Sidewalk", (244, 35, 232), False),
    ("construction--structure--bridge", "Bridge", (150, 100, 100), False),
    ("construction--structure--building", "Building", (70, 70, 70), False),
    ("construction--structure--tunnel", "Tunnel", (150, 120, 90), False),
    ("human--person", "Person", (220, 20, 60), True),
    ("human--rider--bicyclist", "Bicyclist", (255, 0, 0), True),
    ("human--rider--motorcyclist", "Motorcyclist", (255, 0, 100), True),
    ("human--rider--other-rider", "Other Rider", (255, 0, 200), True),
    ("marking--crosswalk-zebra", "Lane Marking - Crosswalk", (200, 128, 128), True),
    ("marking--general", "Lane Marking - General", (255, 255, 255), False),
    ("nature--mountain", "Mountain", (64, 170, 64), False),
    ("nature--sand", "Sand", (230, 160, 50), False),
    ("nature--sky", "Sky", (70, 130, 180), False),
    ("nature--snow", "Snow", (190, 255, 255), False),
    ("nature--terrain", "Terrain", (152, 251, 152), False),
    ("nature--vegetation", "Vegetation", (107, 142, 35), False),
    ("nature--water", "Water", (0, 170, 30), False),
    ("object--banner", "Banner", (255, 255, 128), True),
    ("object--bench", "Bench", (250, 0, 30), True),
    ("object--bike-rack", "Bike Rack", (100, 140, 180), True),
    ("object--billboard", "Billboard", (220, 220, 220), True),
    ("object--catch-basin", "Catch Basin", (220, 128, 128), True),
    ("object--cctv-camera", "CCTV Camera", (222, 40, 40), True),
    ("object--fire-hydrant", "Fire Hydrant", (100, 170, 30), True),
    ("object--junction-box", "Junction Box", (40, 40, 40), True),
    ("object--mailbox", "Mailbox", (33, 33, 33), True),
    ("object--manhole", "Manhole", (100, 128, 160), True),
    ("object--phone-booth", "Phone Booth", (142, 0, 0), True),
    ("object--pothole", "Pothole", (70, 100, 150), False),
    ("object--street-light", "Street Light", (210, 170, 100), True),
    ("object--support--pole", "Pole", (153, 153, 153), True),
    ("object--support--traffic-sign-frame", "Traffic Sign Frame", (128, 128, 128), True),
    ("object--support--utility-pole", "Utility Pole", (0, 0, 80), True),
    ("object--traffic-light", "Traffic Light", (250, 170, 30), True),
    ("object--traffic-sign--back", "Traffic Sign (Back)", (192, 192, 192), True),
    ("object--traffic-sign--front", "Traffic Sign (Front)", (220, 220, 0), True),
    ("object--trash-can", "Trash Can", (140, 140, 20), True),
    ("object--vehicle--bicycle", "Bicycle", (119, 11, 32), True),
    ("object--vehicle--boat", "Boat", (150, 0, 255), True),
    ("object--vehicle--bus", "Bus", (0, 60, 100), True),
    ("object--vehicle--car", "Car", (0, 0, 142), True),
    ("object--vehicle--caravan", "Caravan", (0, 0, 90), True),
    ("object--vehicle--motorcycle", "Motorcycle", (0, 0, 230), True),
    ("object--vehicle--on-rails", "On Rails", (0, 80, 100), False),
    ("object--vehicle--other-vehicle", "Other Vehicle", (128, 64, 64), True),
    ("object--vehicle--trailer", "Trailer", (0, 0, 110), True),
    ("object--vehicle--truck", "Truck", (0, 0, 70), True),
    ("object--vehicle--wheeled-slow", "Wheeled Slow", (0, 0, 192), True),
    ("void--car-mount", "Car Mount", (32, 32, 32), False),
    ("void--ego-vehicle", "Ego Vehicle", (120, 10, 10), False),
    ("void--unlabeled", "Unlabeled", (0, 0, 0), False),
)
MAPILLARY_V12_NAMES: tuple[str, ...] = tuple(label[0] for label in MAPILLARY_V12_LABELS)


def mapillary_v12_config() -> dict:
    """The content of ``config_v1.2.json`` in the official format (labels in official order)."""
    return {
        "labels": [
            {"name": name, "readable": readable, "color": list(color), "instances": instances,
             "evaluate": name != "void--unlabeled"}
            for name, readable, color, instances in MAPILLARY_V12_LABELS
        ],
        "version": "1.2",
        "mapping": "public",
        "folder_structure": "{split}/{content}/{key:.{22}}.{ext}",
    }


# Mapillary names that are not a Cityscapes class name, matched on their last one or two
# "--"-separated components (DESIGN section 4); a name matching neither these nor a class is 255.
_MAPILLARY_RULES: dict[tuple[str, ...], str] = {
    ("traffic-sign-frame",): "traffic sign",
    ("traffic-sign", "front"): "traffic sign",
    ("traffic-sign", "back"): "traffic sign",
    ("on-rails",): "train",
    ("rider", "bicyclist"): "rider",
    ("rider", "motorcyclist"): "rider",
    ("rider", "other-rider"): "rider",
    ("street-light",): "pole",
    ("utility-pole",): "pole",
    ("curb",): "sidewalk",
    ("curb-cut",): "sidewalk",
    ("pedestrian-area",): "sidewalk",
    ("crosswalk-plain",): "road",
    ("parking",): "road",
    ("bike-lane",): "road",
    ("service-lane",): "road",
    ("marking", "general"): "road",
    ("marking", "crosswalk-zebra"): "road",
}


def mapillary_name_to_train_id(name: str) -> int:
    """Train id of one Mapillary label ``name`` by the rules of DESIGN section 4, else 255."""
    parts = tuple(name.split("--"))
    for width in (2, 1):
        if len(parts) >= width and parts[-width:] in _MAPILLARY_RULES:
            return CLASSES.index(_MAPILLARY_RULES[parts[-width:]])
    last = parts[-1].replace("-", " ")
    return CLASSES.index(last) if last in CLASSES else IGNORE_INDEX


def mapillary_to_train_id(config: dict) -> np.ndarray:
    """256-entry uint8 table: Mapillary label index (position in ``config["labels"]``) -> train id.

    Built from the label names, so it follows whatever order the config file lists them in. Raises
    :class:`UserError` if the config has no ``labels`` list or none of its names maps to a class.
    """
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, dict) and "name" in x for x in labels):
        raise UserError("Mapillary config has no 'labels' list of {'name': ...} entries; "
                        "use the config_v1.2.json shipped with Mapillary Vistas v1.2")
    if len(labels) > 256:
        raise UserError(f"Mapillary config lists {len(labels)} labels, more than 8-bit label PNGs "
                        "can hold; use the config_v1.2.json shipped with Mapillary Vistas v1.2")
    lut = _lookup_table({i: mapillary_name_to_train_id(str(x["name"])) for i, x in enumerate(labels)})
    if not (lut < NUM_CLASSES).any():
        raise UserError("no label name in the Mapillary config maps to a Cityscapes class "
                        f"(first names: {', '.join(str(x['name']) for x in labels[:3])}); "
                        "use the config_v1.2.json shipped with Mapillary Vistas v1.2")
    return lut
