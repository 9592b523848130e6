"""Flowers-102, FGVC Aircraft, Indoor-67 and CUB-200 readers on tiny fixtures in the real layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from recast.data import DataError, load_split, prepare_paper_task, read_manifest
from recast.data.raw import decode_image

EXPECTED = {  # name: (num_classes, trainval, test, class name 0)
    "flowers102": (102, 6, 6, "flower_000"),
    "aircraft": (4, 8, 8, "707-320"),
    "indoor67": (3, 9, 3, "airport_inside"),
    "cub200": (3, 9, 3, "Black_footed_Albatross"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_prepare_image_task(tmp_path, fx, name):
    fx.images[name](tmp_path / "raw")
    task_dir = prepare_paper_task(name, tmp_path / "raw", tmp_path / "out", seed=0, val_fraction=0.34, image_size=16)
    m = read_manifest(task_dir)
    num_classes, trainval, test, first = EXPECTED[name]
    assert (m.num_classes, m.class_names[0], m.image_size) == (num_classes, first, (16, 16))
    assert m.counts["train"] + m.counts["val"] == trainval and m.counts["test"] == test
    assert m.counts["val"] >= 2
    assert m.augment.crop == "resized" and m.augment.hflip
    for split in ("train", "val", "test"):
        x, y = load_split(task_dir, split)
        assert x.shape == (m.counts[split], 3, 16, 16)
        # Solid-colour fixtures: every stored pixel is the colour of the stored label
        # (for Aircraft this also proves the white banner was cut off).
        expected = torch.tensor([fx.colour(int(lab)) for lab in y], dtype=torch.float32)[:, :, None, None]
        assert (x.float() - expected).abs().max() <= 6, split


def test_decode_image_resizes_shorter_side_and_centre_crops(tmp_path):
    array = np.zeros((20, 60, 3), np.uint8)  # H=20, W=60: left third red, middle green, right blue
    array[:, :20, 0] = array[:, 20:40, 1] = array[:, 40:, 2] = 255
    Image.fromarray(array).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", 10)  # -> 30x10, centre crop 10x10 = the green third
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    inner = out[:, :, 1:-1]  # the outer columns blend with the neighbours (antialiased resize)
    assert inner[1].min() == 255 and inner[0].max() == 0 and inner[2].max() == 0
    assert out[1].min() > 200
    Image.fromarray(array).convert("L").save(tmp_path / "g.png")
    assert decode_image(tmp_path / "g.png", 10).shape == (3, 10, 10)


def test_corrupt_and_truncated_images_name_the_file(tmp_path, fx):
    d = fx.images["flowers102"](tmp_path / "raw")
    bad = d / "jpg" / "image_00008.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"image_00008\.jpg: cannot decode image"):
        prepare_paper_task("flowers102", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)
    assert not (tmp_path / "out" / "flowers102").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no temp dir left behind
    fx.write_jpg(bad, 1, size=(200, 200))
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError, match=r"image_00008\.jpg: cannot decode image"):
        prepare_paper_task("flowers102", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)


def test_flowers_wrong_label_count(tmp_path, fx):
    d = fx.images["flowers102"](tmp_path / "raw")
    savemat(d / "imagelabels.mat", {"labels": np.ones((1, 11), np.int64)})
    with pytest.raises(DataError, match=r"imagelabels\.mat: 11 labels for 12 images"):
        prepare_paper_task("flowers102", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)
    (d / "setid.mat").write_bytes(b"garbage")
    savemat(d / "imagelabels.mat", {"labels": np.ones((1, 12), np.int64)})
    with pytest.raises(DataError, match=r"setid\.mat: not a readable \.mat file"):
        prepare_paper_task("flowers102", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)


def test_cub_label_file_with_a_missing_line(tmp_path, fx):
    d = fx.images["cub200"](tmp_path / "raw")
    lines = (d / "image_class_labels.txt").read_text().splitlines()
    (d / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"image_class_labels\.txt: 11 entries for 12 images"):
        prepare_paper_task("cub200", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)


def test_indoor_missing_listed_image(tmp_path, fx):
    d = fx.images["indoor67"](tmp_path / "raw")
    (d / "Images" / "bakery" / "bakery_0001.jpg").unlink()
    with pytest.raises(DataError, match=r"bakery_0001\.jpg: image listed in the split files is missing"):
        prepare_paper_task("indoor67", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)


def test_aircraft_unknown_variant_and_train_val_files(tmp_path, fx):
    d = fx.images["aircraft"](tmp_path / "raw")
    lines = (d / "images_variant_trainval.txt").read_text().splitlines()
    (d / "images_variant_train.txt").write_text("\n".join(lines[:5]) + "\n")
    (d / "images_variant_val.txt").write_text("\n".join(lines[5:]) + "\n")
    (d / "images_variant_trainval.txt").unlink()
    task_dir = prepare_paper_task("aircraft", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)
    m = read_manifest(task_dir)
    assert m.counts["train"] + m.counts["val"] == 8 and m.class_names[2] == "Cessna 172"
    (d / "images_variant_test.txt").write_text("1000008 Boeing 999\n")
    message = r"images_variant_test\.txt: line 1: class 'Boeing 999' is not in variants\.txt"
    with pytest.raises(DataError, match=message):
        prepare_paper_task("aircraft", tmp_path / "raw", tmp_path / "out", seed=0, image_size=16)
