"""Readers of the image-file datasets in their official on-disk layouts.

Each returns a ``RawTask`` (file paths + 0-based labels); decoding happens later, in chunks.
Official train and val splits are merged into ``trainval``; ``prepare_paper_task`` carves
its own val split from it with a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from recast.data.errors import DataError
from recast.data.raw import RawSplit, RawTask

AIRCRAFT_BANNER = 20  # pixels of copyright banner at the bottom of every FGVC Aircraft image


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise DataError(path, f"not a text file ({err})") from None


def _mat_vector(path: Path, key: str) -> np.ndarray:
    try:
        data = loadmat(path)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as err:
        raise DataError(path, f"not a readable .mat file ({type(err).__name__}: {err})") from None
    if key not in data:
        raise DataError(path, f"no variable {key!r} (has {sorted(k for k in data if not k.startswith('__'))})")
    return np.asarray(data[key]).ravel().astype(np.int64)


def _split(root: Path, rel_paths: list[str], labels: list[int]) -> RawSplit:
    paths = tuple(root / p for p in rel_paths)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(missing[0], f"image listed in the split files is missing ({len(missing)} missing in all)")
    return RawSplit(labels=np.asarray(labels, dtype=np.int64), origins=tuple(rel_paths), paths=paths)


def read_flowers102(directory: Path) -> RawTask:
    """Oxford Flowers-102: ``jpg/image_%05d.jpg``, ``imagelabels.mat`` (labels 1..102),
    ``setid.mat`` (``trnid``, ``valid``, ``tstid``). The release has no class names, so
    classes are named ``flower_000`` .. ``flower_101``."""
    directory = Path(directory)
    label_file, setid_file = directory / "imagelabels.mat", directory / "setid.mat"
    labels = _mat_vector(label_file, "labels")
    n_images = len(list((directory / "jpg").glob("image_*.jpg")))
    if len(labels) != n_images:
        raise DataError(label_file, f"{len(labels)} labels for {n_images} images in {directory / 'jpg'}")
    if len(labels) and (labels.min() < 1 or labels.max() > 102):
        raise DataError(label_file, f"labels span {labels.min()}..{labels.max()}, expected 1..102")
    ids = {key: _mat_vector(setid_file, key) for key in ("trnid", "valid", "tstid")}
    for key, values in ids.items():
        if len(values) and (values.min() < 1 or values.max() > len(labels)):
            raise DataError(setid_file, f"{key} holds image ids outside 1..{len(labels)}")

    def split(id_list: np.ndarray) -> RawSplit:
        ids_sorted = np.sort(id_list)
        return _split(directory, [f"jpg/image_{i:05d}.jpg" for i in ids_sorted], list(labels[ids_sorted - 1] - 1))

    return RawTask(
        class_names=tuple(f"flower_{i:03d}" for i in range(102)),
        trainval=split(np.concatenate([ids["trnid"], ids["valid"]])),
        test=split(ids["tstid"]),
        origin=str(directory),
    )


def read_aircraft(directory: Path, annotation: Literal["variant", "family", "manufacturer"] = "variant") -> RawTask:
    """FGVC Aircraft (``fgvc-aircraft-2013b/data``): ``images/<id>.jpg``, ``{annotation}s.txt``
    and ``images_{annotation}_{trainval,test}.txt`` (or ``_train`` + ``_val``), lines
    ``<id> <class name>``. The 20-pixel copyright banner is cut from every image."""
    if annotation not in ("variant", "family", "manufacturer"):
        raise ValueError(f"annotation={annotation!r}; choose variant, family or manufacturer")
    directory = Path(directory)
    names_file = directory / ("families.txt" if annotation == "family" else f"{annotation}s.txt")
    names = tuple(_lines(names_file))
    index = {name: i for i, name in enumerate(names)}

    def read(split_names: list[str]) -> RawSplit:
        rel, labels = [], []
        for split_name in split_names:
            path = directory / f"images_{annotation}_{split_name}.txt"
            for line_no, line in enumerate(_lines(path), 1):
                image_id, _, name = line.partition(" ")
                if name not in index:
                    raise DataError(path, f"line {line_no}: class {name!r} is not in {names_file.name}")
                rel.append(f"images/{image_id}.jpg")
                labels.append(index[name])
        return _split(directory, rel, labels)

    trainval = ["trainval"] if (directory / f"images_{annotation}_trainval.txt").is_file() else ["train", "val"]
    return RawTask(names, read(trainval), read(["test"]), str(directory), crop_bottom=AIRCRAFT_BANNER)


def read_indoor67(directory: Path) -> RawTask:
    """MIT Indoor Scenes-67: ``Images/<class>/<file>``, ``TrainImages.txt`` / ``TestImages.txt``
    listing ``<class>/<file>``; classes are the sorted sub-directories of ``Images``."""
    directory = Path(directory)
    images = directory / "Images"
    if not images.is_dir():
        raise DataError(images, "directory not found")
    names = tuple(sorted(p.name for p in images.iterdir() if p.is_dir()))
    index = {name: i for i, name in enumerate(names)}

    def read(list_file: str) -> RawSplit:
        path = directory / list_file
        rel, labels = [], []
        for line_no, line in enumerate(_lines(path), 1):
            cls = line.split("/", 1)[0]
            if cls not in index:
                raise DataError(path, f"line {line_no}: class {cls!r} has no directory in {images}")
            rel.append(f"Images/{line}")
            labels.append(index[cls])
        return _split(directory, rel, labels)

    return RawTask(names, read("TrainImages.txt"), read("TestImages.txt"), str(directory))


def _id_table(path: Path, n_fields: int = 2) -> dict[int, str]:
    table = {}
    for line_no, line in enumerate(_lines(path), 1):
        parts = line.split(" ", n_fields - 1)
        if len(parts) != n_fields or not parts[0].isdigit():
            raise DataError(path, f"line {line_no}: expected '<id> <value>', got {line!r}")
        table[int(parts[0])] = parts[1]
    return table


def read_cub200(directory: Path) -> RawTask:
    """CUB-200-2011: ``images/``, ``images.txt``, ``image_class_labels.txt`` (1-based),
    ``train_test_split.txt`` (1 = train), ``classes.txt`` (``001.Black_footed_Albatross``)."""
    directory = Path(directory)
    classes = _id_table(directory / "classes.txt")
    names = tuple(classes[i].split(".", 1)[-1] for i in sorted(classes))
    images = _id_table(directory / "images.txt")
    labels = _id_table(directory / "image_class_labels.txt")
    is_train = _id_table(directory / "train_test_split.txt")
    for file, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if set(table) != set(images):
            problem = f"{len(table)} entries for {len(images)} images in images.txt (ids differ)"
            raise DataError(directory / file, problem)
    bad = [i for i in images if not labels[i].isdigit() or not 1 <= int(labels[i]) <= len(names)]
    if bad:
        problem = f"image {bad[0]}: label {labels[bad[0]]!r} outside 1..{len(names)}"
        raise DataError(directory / "image_class_labels.txt", problem)

    def read(flag: str) -> RawSplit:
        ids = [i for i in sorted(images) if is_train[i] == flag]
        return _split(directory, [f"images/{images[i]}" for i in ids], [int(labels[i]) - 1 for i in ids])

    return RawTask(names, read("1"), read("0"), str(directory))
