"""CAMELYON16: the folder layout, slide labels, ASAP lesion annotations, and the bag dataset.

The layout the data ships in (only the parts used here)::

    CAMELYON16/
    ├── training/
    │   ├── normal/normal_001.tif ...        label 0
    │   ├── tumor/tumor_001.tif ...          label 1 (has metastases)
    │   └── lesion_annotations/tumor_001.xml ASAP XML outlines of the lesions of tumor slides
    │                                        (a top-level lesion_annotations/ is accepted too)
    ├── testing/
    │   ├── images/test_001.tif ...
    │   ├── lesion_annotations/test_001.xml  (optional)
    │   └── reference.csv                    rows "test_001,Tumor,..." / "test_002,Normal,..."
    └── features/                            one bag per slide: tumor_001.h5, test_001.h5, ...
                                             (written by `ips extract-features CAMELYON16/`)

Slide names (file stems) are unique across the dataset, so one folder holds every bag. The
slide label is "has metastases": the training folder it lies in, or the test reference CSV.
Missing folders, a tumour slide's XML for a slide that is not a tumour slide, test images the
reference does not list and listed images that are missing are errors naming the files.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from defusedxml import DefusedXmlException, DTDForbidden, EntitiesForbidden
from defusedxml.ElementTree import parse as parse_untrusted_xml

from ips.config import TaskSpec
from ips.data.feature_bags import FeatureBagDataset, find_bag, open_feature_bag
from ips.errors import InputError, MissingFileError
from ips.files import atomic_write

log = logging.getLogger(__name__)

TASK = "metastases"  # the one task: does the slide hold metastases (binary)
SLIDE_SUFFIXES = (".tif", ".tiff")
SPLITS = ("train", "test")
EXCLUSION_GROUPS = frozenset({"_2", "exclusion", "none"})  # holes inside lesions
LABELS = {"tumor": 1, "tumour": 1, "normal": 0}


@dataclass(frozen=True)
class CamelyonSlide:
    """One slide of the layout."""

    name: str  # file stem, e.g. "tumor_001": the bag is <features>/<name>.h5
    path: Path  # the slide file
    split: str  # "train" or "test"
    label: int  # 1: has metastases, 0: normal
    annotation: Path | None  # ASAP XML of its lesions, if there is one


def is_camelyon16(folder: str | os.PathLike) -> bool:
    """True when `folder` has the CAMELYON16 layout (training/normal, training/tumor or
    testing/images)."""
    folder = Path(folder)
    return any(
        (folder / sub).is_dir() for sub in ("training/normal", "training/tumor", "testing/images")
    )


def slide_files(root: str | os.PathLike) -> list[Path]:
    """Every slide of a CAMELYON16 folder (training normal, tumour, then test), without
    checking labels; for feature extraction."""
    root = Path(root)
    files: list[Path] = []
    for sub in ("training/normal", "training/tumor", "testing/images"):
        files.extend(_slides_in(root / sub))
    return files


def camelyon16_slides(root: str | os.PathLike, split: str) -> list[CamelyonSlide]:
    """The slides of one split with their labels and annotations, checked against each other.

    Args:
        root: the CAMELYON16 folder.
        split: "train" (training/normal + training/tumor) or "test" (testing/images, labelled
            by testing/reference.csv).

    Returns:
        Slides sorted by name.
    """
    root = Path(root)
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise MissingFileError(f"{root}: no such CAMELYON16 folder")
    if split == "train":
        return _training_slides(root)
    return _test_slides(root)


def _slides_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES
    )


def _required_folder(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise MissingFileError(
            f"{folder}: missing; a CAMELYON16 folder needs {what} (see ips.data.camelyon16)"
        )
    return folder


def _xml_files(folders: Sequence[Path]) -> dict[str, Path]:
    """Annotation files by slide name from the first folders that exist."""
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.xml")):
                found.setdefault(path.stem, path)
    return found


def _training_slides(root: Path) -> list[CamelyonSlide]:
    normal = _slides_in(_required_folder(root / "training" / "normal", "training/normal/*.tif"))
    tumor = _slides_in(_required_folder(root / "training" / "tumor", "training/tumor/*.tif"))
    if not normal and not tumor:
        raise MissingFileError(f"{root / 'training'}: no .tif slides in normal/ or tumor/")
    _check_unique(normal + tumor)
    xmls = _xml_files([root / "training" / "lesion_annotations", root / "lesion_annotations"])
    tumor_names = {p.stem for p in tumor}
    unmatched = sorted(name for name in xmls if name not in tumor_names)
    if unmatched:
        raise InputError(
            f"{xmls[unmatched[0]].parent}: lesion annotations for slides that are not in "
            f"training/tumor: {', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''}"
        )
    without = [p.stem for p in tumor if p.stem not in xmls]
    if without:
        log.warning(
            "%d tumour slide(s) have no lesion annotation (%s); their labels come from the folder",
            len(without),
            ", ".join(without[:5]),
        )
    slides = [CamelyonSlide(p.stem, p, "train", 0, None) for p in normal]
    slides += [CamelyonSlide(p.stem, p, "train", 1, xmls.get(p.stem)) for p in tumor]
    return sorted(slides, key=lambda s: s.name)


def _test_slides(root: Path) -> list[CamelyonSlide]:
    images = _slides_in(_required_folder(root / "testing" / "images", "testing/images/*.tif"))
    _check_unique(images)
    reference = root / "testing" / "reference.csv"
    if not reference.is_file():
        raise MissingFileError(
            f"{reference}: missing; the test labels come from this CSV "
            "(rows: image name, Tumor or Normal, ...)"
        )
    labels = read_reference(reference)
    by_name = {p.stem.lower(): p for p in images}
    unlisted = sorted(p.stem for p in images if p.stem.lower() not in labels)
    absent = sorted(name for name in labels if name not in by_name)
    for names, what in ((unlisted, f"are not listed in {reference}"), (absent, "are missing")):
        if names:
            raise InputError(
                f"{root / 'testing'}: {len(names)} test image(s) {what}: "
                f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
            )
    xmls = {k.lower(): v for k, v in _xml_files([root / "testing" / "lesion_annotations"]).items()}
    stray = sorted(name for name in xmls if name not in by_name)
    if stray:
        raise InputError(
            f"{root / 'testing' / 'lesion_annotations'}: annotations for slides that are not in "
            f"testing/images: {', '.join(stray[:5])}"
        )
    slides = [
        CamelyonSlide(p.stem, p, "test", labels[p.stem.lower()], xmls.get(p.stem.lower()))
        for p in images
    ]
    return sorted(slides, key=lambda s: s.name)


def _check_unique(paths: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise InputError(f"two slides are called {path.stem}: {seen[path.stem]} and {path}")
        seen[path.stem] = path


def read_reference(path: str | os.PathLike) -> dict[str, int]:
    """Test labels from the reference CSV: image name (lower case, no suffix) -> 1 (Tumor) or
    0 (Normal). Columns after the second (lesion type, ...) are ignored; a header row is
    skipped."""
    path = Path(path)
    labels: dict[str, int] = {}
    with path.open(newline="") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            kind = cells[1].lower() if len(cells) > 1 else ""
            if kind not in LABELS:
                if number == 1:  # a header
                    continue
                raise InputError(
                    f"{path}, line {number}: expected 'name,Tumor' or 'name,Normal', got {row}"
                )
            name = cells[0]
            if name.lower().endswith(SLIDE_SUFFIXES):
                name = name.rsplit(".", 1)[0]
            name = name.lower()
            if name in labels:
                raise InputError(f"{path}, line {number}: {cells[0]} is listed twice")
            labels[name] = LABELS[kind]
    if not labels:
        raise InputError(f"{path}: no labelled rows")
    return labels


# ---- ASAP XML -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Annotation:
    """One outline of an ASAP XML file."""

    name: str  # the annotation's Name
    group: str  # PartOfGroup: lesions ("Tumor", "_0", "_1") or holes ("_2", "Exclusion")
    kind: str  # Type: "Polygon", "Spline", "Rectangle", ...
    points: np.ndarray  # (K, 2) level-0 (x, y), in the order of their Order attribute

    @property
    def is_exclusion(self) -> bool:
        """True for outlines of normal tissue cut out of a lesion."""
        return self.group.lower() in EXCLUSION_GROUPS


def read_asap_xml(path: str | os.PathLike) -> list[Annotation]:
    """The outlines of an ASAP XML file (the format of the CAMELYON lesion annotations).

    Annotation files come from elsewhere, so they are read as data: a DTD or entity
    declaration is refused before anything expands (defusedxml), and every coordinate must be
    a finite, non-negative number. Outlines need at least 3 points (`POINT_KINDS`, which mark
    places, need 1). Each problem is an InputError naming the file and the annotation.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    root = _parse_xml(path)
    if root.tag != "ASAP_Annotations":
        raise InputError(f"{path}: expected an <ASAP_Annotations> document, got <{root.tag}>")
    return [_annotation(path, i, element) for i, element in enumerate(root.iter("Annotation"))]


POINT_KINDS = frozenset({"dot", "pointset", "measurement"})  # ASAP types that are not areas


def _parse_xml(path: Path) -> ET.Element:
    """The root of an XML file that declares no DTD and no entities."""
    try:
        return parse_untrusted_xml(path, forbid_dtd=True).getroot()
    except DTDForbidden as err:
        reason = _why_refused(path, err)
    except DefusedXmlException as err:  # entities need a DTD, so this is unlikely
        reason = str(err)
    except ET.ParseError as err:
        raise InputError(f"{path}: not valid XML ({err})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({' '.join(str(err).split())})") from None
    raise InputError(f"{path}: refused: {reason}; ASAP annotation files have no DTD") from None


def _why_refused(path: Path, err: DTDForbidden) -> str:
    """Why a file with a DTD is refused: the first entity it declares, else the DTD itself.
    The second parse forbids entities, so it stops at the first declaration, unexpanded."""
    doctype = f"<!DOCTYPE {err.name}" + (f" SYSTEM {err.sysid!r}>" if err.sysid else ">")
    try:
        parse_untrusted_xml(path, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except EntitiesForbidden as entity:
        if entity.sysid is not None:
            return (
                f"it declares the external entity {entity.name!r} (SYSTEM {entity.sysid!r}), "
                "which would read another file or URL"
            )
        return (
            f"it declares the entity {entity.name!r}, and entities can expand without bound "
            "(the 'billion laughs' attack)"
        )
    except (ValueError, SyntaxError):  # other refusals and parse errors: the DTD is the reason
        pass
    return f"it has a DTD ({doctype}), which can declare entities that expand or read files"


def _annotation(path: Path, index: int, element: ET.Element) -> Annotation:
    """One <Annotation> element, its coordinates checked and sorted by their Order."""
    name = element.get("Name", "")
    where = f"{path}: annotation {index} ({name!r})"
    points = []
    for coordinate in element.iter("Coordinate"):
        try:
            order = float(coordinate.get("Order", len(points)))
            x = float(coordinate.get("X", "").replace(",", "."))
            y = float(coordinate.get("Y", "").replace(",", "."))
        except ValueError:
            raise InputError(
                f"{where}: expected numeric Order, X and Y on every Coordinate, got "
                f"{dict(coordinate.attrib)}"
            ) from None
        if not all(math.isfinite(v) for v in (order, x, y)):  # (outlines may cross the edge)
            raise InputError(
                f"{where}: expected finite level-0 X and Y on every Coordinate, got "
                f"{dict(coordinate.attrib)}"
            )
        points.append((order, x, y))
    kind = element.get("Type", "Polygon")
    least = 1 if kind.lower() in POINT_KINDS else 3
    if len(points) < least:
        raise InputError(
            f"{where}: a {kind} needs at least {least} coordinate(s), got {len(points)}"
        )
    points.sort(key=lambda p: p[0])
    return Annotation(
        name=name,
        group=element.get("PartOfGroup", "None"),
        kind=kind,
        points=np.array([p[1:] for p in points], dtype=np.float64).reshape(-1, 2),
    )


def write_asap_xml(
    path: str | os.PathLike,
    polygons: Sequence[np.ndarray],
    *,
    group: str | Sequence[str] = "Tumor",
) -> Path:
    """Write outlines (each (K, 2) level-0 (x, y)) as an ASAP XML file, atomically.

    Args:
        path: the file.
        polygons: the outlines.
        group: the PartOfGroup of every outline, or one per outline (e.g. "_2" for holes).
    """
    groups = [group] * len(polygons) if isinstance(group, str) else list(group)
    if len(groups) != len(polygons):
        raise InputError(f"got {len(polygons)} polygons but {len(groups)} groups")
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    for i, (polygon, name) in enumerate(zip(polygons, groups, strict=True)):
        element = ET.SubElement(
            annotations,
            "Annotation",
            Name=f"Annotation {i}",
            Type="Polygon",
            PartOfGroup=name,
            Color="#F4FA58",
        )
        coordinates = ET.SubElement(element, "Coordinates")
        for order, (x, y) in enumerate(np.asarray(polygon, dtype=np.float64).reshape(-1, 2)):
            ET.SubElement(coordinates, "Coordinate", Order=str(order), X=f"{x:.4f}", Y=f"{y:.4f}")
    element = ET.SubElement(root, "AnnotationGroups")
    for name in dict.fromkeys(groups):
        ET.SubElement(ET.SubElement(element, "Group", Name=name, PartOfGroup="None"), "Attributes")
    ET.indent(root)
    path = Path(path)
    with atomic_write(path) as fh:
        ET.ElementTree(root).write(fh, encoding="utf-8", xml_declaration=True)
    return path


def lesion_patches(
    annotations: Sequence[Annotation],
    coords: np.ndarray,
    patch_size_level0: float,
    min_fraction: float = 0.25,
) -> np.ndarray:
    """Which patches lie in a lesion (lesion outlines minus exclusion outlines), measured on
    a mask of at least 16 x 16 pixels per patch (at most 4096 on the longest side).

    Args:
        annotations: the outlines of one slide.
        coords: (N, 2) level-0 (x, y) of the patches' top-left corners.
        patch_size_level0: patch side in level-0 pixels.
        min_fraction: least share of a patch inside a lesion.

    Returns:
        (N,) bool.
    """
    from PIL import Image, ImageDraw

    from ips.sources.tissue import tissue_patch_ids

    coords = np.asarray(coords).reshape(-1, 2)
    shapes = [a for a in annotations if len(a.points) >= 3]
    out = np.zeros(len(coords), dtype=bool)
    if not shapes or not len(coords):
        return out
    extent = np.concatenate([coords.max(0) + patch_size_level0] + [a.points.max(0) for a in shapes])
    width, height = (max(1, math.ceil(v)) for v in extent.reshape(-1, 2).max(0))
    downsample = max(1.0, max(width, height) / 4096, patch_size_level0 / 16)
    canvas = Image.new("L", (math.ceil(width / downsample), math.ceil(height / downsample)), 0)
    draw = ImageDraw.Draw(canvas)
    for exclusion in (False, True):  # lesions first, then the holes cut out of them
        for a in shapes:
            if a.is_exclusion == exclusion:
                points = a.points / downsample - 0.5
                draw.polygon([tuple(p) for p in points], fill=0 if exclusion else 1)
    mask = np.asarray(canvas) > 0
    out[tissue_patch_ids(mask, downsample, coords, patch_size_level0, min_fraction)] = True
    return out


# ---- the dataset --------------------------------------------------------------------------


class Camelyon16Bags(FeatureBagDataset):
    """CAMELYON16 slides as feature bags, labelled by the layout (task ``metastases``).

    ``dataset[i]`` is ``{"patches": FeatureBag, "targets": {"metastases": () float32},
    "index": i}``. ``foreground_patches(i)`` says which patches of slide i lie in an annotated
    lesion (all False without an annotation), so training logs the share of selected patches
    that show lesions.

    Args:
        root: the CAMELYON16 folder.
        split: "train" or "test".
        features: the folder of bags (default ``root/features``).
        tasks: must hold the binary task ``metastases``.
        feature_dim: F every bag must have; None: the first bag's.
        indices: positions of the split's slides (sorted by name) to keep.
        missing: a slide without a bag is an error ("fail") or left out ("skip", logged).
        in_memory: serve tensors instead of lazy bags.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        features: str | os.PathLike | None = None,
        tasks: Sequence[TaskSpec] = (TaskSpec(TASK, "binary"),),
        feature_dim: int | None = None,
        indices: Sequence[int] | None = None,
        missing: str = "fail",
        in_memory: bool = False,
    ) -> None:
        self.root = Path(root)
        if not [t for t in tasks if t.name == TASK and t.kind == "binary"] or len(tasks) != 1:
            raise InputError(
                f"model.tasks: the camelyon16 dataset has one binary task, {TASK!r}; "
                f"got {[(t.name, t.kind) for t in tasks]}"
            )
        if missing not in ("fail", "skip"):
            raise InputError(f"data.options.missing must be 'fail' or 'skip', got {missing!r}")
        self.features = Path(features) if features is not None else self.root / "features"
        if not self.features.is_dir():
            raise MissingFileError(
                f"{self.features}: no feature-bag folder; write it with "
                f"`ips extract-features {self.root} --out {self.features}`"
            )
        slides = camelyon16_slides(self.root, split)
        found, absent = [], []
        for slide in slides:
            bag = find_bag(self.features, slide.name)
            if bag is None:
                absent.append(slide.name)
            else:
                found.append((slide, bag))
        if absent:
            message = (
                f"{self.features}: no feature bag for {len(absent)} {split} slide(s) "
                f"({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''})"
            )
            if missing == "fail":
                raise MissingFileError(
                    f"{message}; run `ips extract-features {self.root} --out {self.features}` "
                    "or set data.options.missing: skip"
                )
            log.warning("%s; left out", message)
        if indices is not None:
            found = [found[i] for i in indices]
        if not found:
            raise InputError(f"{self.root}: no {split} slide with a feature bag")
        self.split = split
        self.slides = [slide for slide, _ in found]
        super().__init__(
            [bag for _, bag in found],
            [{TASK: slide.label} for slide in self.slides],
            tasks,
            feature_dim=feature_dim,
            names=[slide.name for slide in self.slides],
            in_memory=in_memory,
        )

    def foreground_patches(self, i: int) -> np.ndarray:
        """(N_i,) bool: the patches of slide i of which a quarter or more lies in an annotated
        lesion."""
        cache = self.__dict__.setdefault("_lesions", {})
        if i not in cache:
            cache[i] = self._lesion_patches(i)
        return cache[i]

    def _lesion_patches(self, i: int) -> np.ndarray:
        slide = self.slides[i]
        if slide.annotation is None:
            return np.zeros(self.num_patches[i], dtype=bool)
        with open_feature_bag(self.bags[i]) as bag:
            if bag.coords is None:
                return np.zeros(len(bag), dtype=bool)
            return lesion_patches(
                read_asap_xml(slide.annotation), bag.coords, bag.patch_size_level0
            )


# ---- a synthetic folder for tests and demos -----------------------------------------------
