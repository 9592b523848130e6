"""The embedded offline suite: contents, sizes, disjointness from the source set, options."""

from __future__ import annotations

import hashlib

import pytest
import torch

import pyarrow.parquet as pq

from recast.data import (
    OFFLINE_TASKS,
    SOURCE_TASK,
    BatchLoader,
    build_offline_suite,
    describe,
    load_split,
    read_manifest,
)
from recast.data.offline import SPECS

EXPECTED_COUNTS = {  # 20% of each class test, 10% of the rest val
    "mnist_lo5": {"train": 900, "val": 100, "test": 250},
    "mnist_hi5_inv": {"train": 900, "val": 100, "test": 250},
    "mnist_rot": {"train": 1800, "val": 200, "test": 500},
    "mnist_color": {"train": 1800, "val": 200, "test": 500},
    "uci_digits": {"train": 1295, "val": 143, "test": 359},
    SOURCE_TASK: {"train": 1800, "val": 200, "test": 500},
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline")
    names = build_offline_suite(out, seed=0)
    return out, names


def _hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images}


def _origins(task_dir, split) -> list[str]:
    return pq.read_table(task_dir / f"{split}.parquet", columns=["origin"]).column(0).to_pylist()


def test_suite_tasks_counts_and_manifests(suite):
    out, names = suite
    assert names == list(OFFLINE_TASKS) and len(names) >= 4
    assert len({SPECS[n].domain for n in names}) == len(names)
    for name, counts in EXPECTED_COUNTS.items():
        m = read_manifest(out / name)  # verifies every sha256
        assert m.counts == counts, name
        assert (m.image_size, m.channels) == ((32, 32), 3)
        assert m.augment.crop == "pad" and m.augment.padding == 2 and not m.augment.hflip
        x, y = load_split(out / name, "test")
        assert x.shape == (counts["test"], 3, 32, 32)
        assert torch.bincount(y, minlength=m.num_classes).min() > 0
    assert read_manifest(out / "mnist_lo5").class_names == ("0", "1", "2", "3", "4")
    assert read_manifest(out / "mnist_hi5_inv").class_names == ("5", "6", "7", "8", "9")


def test_no_test_image_is_shared_with_the_source_set(suite):
    out, names = suite
    source = set()
    source_origins = set()
    for split in ("train", "val", "test"):
        source |= _hashes(load_split(out / SOURCE_TASK, split)[0])
        source_origins |= set(_origins(out / SOURCE_TASK, split))
    for name in names:
        test_images = load_split(out / name, "test")[0]
        assert not (_hashes(test_images) & source), name
        for split in ("train", "val", "test"):
            assert not (set(_origins(out / name, split)) & source_origins), (name, split)
    # Plain MNIST tasks store images exactly as the source does, so the hash check is meaningful there.
    lo5 = set()
    for split in ("train", "val", "test"):
        lo5 |= _hashes(load_split(out / "mnist_lo5", split)[0])
    assert len(lo5) == 1250 and not lo5 & source


def test_an_image_is_never_test_in_one_task_and_train_in_another(suite):
    out, names = suite
    mnist = [n for n in names if n.startswith("mnist")]
    test = set().union(*(_origins(out / n, "test") for n in mnist))
    train = set().union(*(_origins(out / n, s) for n in mnist for s in ("train", "val")))
    assert len(test) == 500 and not test & train


def test_task_variants_look_as_described(suite):
    out, _ = suite
    lo = load_split(out / "mnist_lo5", "train")[0].float().mean() / 255
    inv = load_split(out / "mnist_hi5_inv", "train")[0].float().mean() / 255
    assert lo < 0.25 and inv > 0.75
    colour = load_split(out / "mnist_color", "train")[0].float()
    assert (colour[:, 0] - colour[:, 1]).abs().mean() > 10  # not grey
    assert torch.equal(load_split(out / "mnist_lo5", "train")[0][:, 0], load_split(out / "mnist_lo5", "train")[0][:, 2])
    uci = read_manifest(out / "uci_digits")
    assert uci.origin == "sklearn load_digits" and uci.num_classes == 10


def test_loader_on_the_suite_is_fast_enough_to_iterate(suite):
    out, _ = suite
    loader = BatchLoader(out / "mnist_color", "train", 128, 32, train=True, seed=0)
    n = sum(len(y) for _, y in loader)
    assert n == 1800 and len(loader) == 15


def test_describe_mentions_every_task():
    text = describe()
    for name in (*OFFLINE_TASKS, SOURCE_TASK):
        assert name in text
    assert "1797 images" in text


def test_options_and_determinism(tmp_path):
    a = build_offline_suite(tmp_path / "a", seed=3, image_size=16, tasks=["uci_digits"])
    build_offline_suite(tmp_path / "b", seed=3, image_size=16, tasks=["uci_digits"])
    assert a == ["uci_digits"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["source", "uci_digits"]
    ma, mb = read_manifest(tmp_path / "a" / "uci_digits"), read_manifest(tmp_path / "b" / "uci_digits")
    assert ma.files == mb.files and ma.image_size == (16, 16) and ma.augment.padding == 1
    assert load_split(tmp_path / "a" / "source", "val")[0].shape == (200, 3, 16, 16)
    with pytest.raises(ValueError, match=r"unknown offline tasks \['svhn'\]"):
        build_offline_suite(tmp_path, tasks=["svhn"])
    with pytest.raises(ValueError, match="val_fraction=0.6"):
        build_offline_suite(tmp_path, val_fraction=0.6)
