"""CIFAR readers (binary and python versions), the restricted unpickler, preparing CIFAR."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recast.data import DataError, RestrictedUnpickler, load_split, prepare_paper_task, read_manifest
from recast.data.cifar import read_cifar_binary, read_cifar_python, restricted_load
from recast.data.paper import locate


def _records_by_origin(raw):
    return {f"{name}{ext}:{i}": (data[i].reshape(3, 32, 32), int(labels[i]))
            for ext in ("", ".bin") for name, (data, labels) in raw.items() for i in range(len(labels))}


@pytest.mark.parametrize("version", ["bin", "py"])
def test_prepare_cifar10_keeps_exact_pixels_and_labels(tmp_path, fx, cifar_raw, version):
    raw = cifar_raw["cifar10"]
    (fx.write_cifar10_bin if version == "bin" else fx.write_cifar10_py)(tmp_path / "raw", raw)
    task_dir = prepare_paper_task("cifar10", tmp_path / "raw", tmp_path / "out", seed=0, val_fraction=0.2)
    m = read_manifest(task_dir)
    assert m.class_names == tuple(fx.cifar10_names) and m.image_size == (32, 32)
    assert m.counts["train"] + m.counts["val"] == 40 and m.counts["test"] == 6
    assert 4 <= m.counts["val"] <= 12
    assert m.augment.crop == "pad" and m.augment.padding == 4 and m.augment.hflip
    by_origin = _records_by_origin(raw)
    for split in ("train", "val", "test"):
        x, y = load_split(task_dir, split)
        origins = pq.read_table(task_dir / f"{split}.parquet", columns=["origin"]).column(0).to_pylist()
        for img, lab, origin in zip(x, y, origins):
            expected_img, expected_lab = by_origin[origin]
            assert torch.equal(img, torch.from_numpy(expected_img)) and int(lab) == expected_lab
        assert all(o.startswith("test_batch") == (split == "test") for o in origins)


def test_binary_and_python_versions_agree(tmp_path, fx, cifar_raw):
    a = read_cifar_binary(fx.write_cifar100_bin(tmp_path, cifar_raw["cifar100"]), 100)
    b = read_cifar_python(fx.write_cifar100_py(tmp_path, cifar_raw["cifar100"]), 100)
    assert a.class_names == b.class_names and len(a.class_names) == 100
    for sa, sb in ((a.trainval, b.trainval), (a.test, b.test)):
        assert np.array_equal(sa.images, sb.images) and np.array_equal(sa.labels, sb.labels)
    assert np.array_equal(a.trainval.labels, cifar_raw["cifar100"]["train"][1])  # the fine label byte


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_1: .*refusing to load global os\.system"):
        restricted_load(path)
    assert not marker.exists()
    unpickler = RestrictedUnpickler(open(path, "rb"))
    reconstruct = unpickler.find_class("numpy._core.multiarray", "_reconstruct")
    assert unpickler.find_class("numpy.core.multiarray", "_reconstruct") is reconstruct  # numpy 1.x pickles
    with pytest.raises(pickle.UnpicklingError):
        unpickler.find_class("builtins", "eval")


def test_truncated_binary_and_bad_labels_name_the_file(tmp_path, fx, cifar_raw):
    d = fx.write_cifar10_bin(tmp_path, cifar_raw["cifar10"])
    data = (d / "data_batch_3.bin").read_bytes()
    (d / "data_batch_3.bin").write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: .* not a whole number of 3073-byte records"):
        read_cifar_binary(d, 10)
    bad = bytearray(data)
    bad[0] = 12
    (d / "data_batch_3.bin").write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: label 12 outside 0\.\.9"):
        read_cifar_binary(d, 10)
    (d / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"batches\.meta\.txt: 2 class names, expected 10"):
        read_cifar_binary(d, 10)


def test_python_version_label_count_mismatch(tmp_path, fx, cifar_raw):
    raw = dict(cifar_raw["cifar10"])
    data, labels = raw["test_batch"]
    raw["test_batch"] = (data, labels[:-1])
    d = fx.write_cifar10_py(tmp_path, raw)
    with pytest.raises(DataError, match=r"test_batch: 5 labels for 6 images"):
        read_cifar_python(d, 10)
    (d / "data_batch_2").write_bytes((d / "data_batch_2").read_bytes()[:50])
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR python file"):
        read_cifar_python(d, 10)


def test_missing_data_root_lists_expected_paths(tmp_path):
    with pytest.raises(DataError) as info:
        prepare_paper_task("cifar10", tmp_path, tmp_path / "out", seed=0)
    message = str(info.value)
    assert "no cifar10 data found" in message
    assert str(tmp_path / "cifar-10-batches-bin") in message and "data_batch_1.bin" in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "download: true" in message
    assert not (tmp_path / "out" / "cifar10").exists()
    (tmp_path / "cifar-100-binary").mkdir()
    with pytest.raises(DataError, match=r"cifar-100-binary/ with .*\[exists, lacks train\.bin, test\.bin"):
        locate("cifar100", tmp_path)


def test_prepare_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown paper task 'imagenet'"):
        prepare_paper_task("imagenet", tmp_path, tmp_path, seed=0)
    with pytest.raises(ValueError, match="val_fraction=0.5"):
        prepare_paper_task("cifar10", tmp_path, tmp_path, seed=0, val_fraction=0.5)
