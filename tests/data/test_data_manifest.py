"""Storage round trip, manifest checks, corrupt/truncated files, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recast.data import AugmentPolicy, DataError, load_split, read_manifest, sha256_file
from recast.data.manifest import write_manifest
from recast.data.storage import TaskWriter, stratified_split, write_task_arrays


def test_round_trip_exact_pixels_labels_and_train_statistics(tiny_task):
    task_dir, splits = tiny_task
    m = read_manifest(task_dir)
    assert (m.name, m.num_classes, m.class_names, m.channels) == ("tiny", 3, ("a", "b", "c"), 3)
    assert m.counts == {"train": 10, "val": 4, "test": 6}
    assert m.image_size == (8, 8)
    assert m.augment == AugmentPolicy("pad", 2)
    assert sorted(m.files) == ["test.parquet", "train.parquet", "val.parquet"]
    assert m.files["val.parquet"] == sha256_file(task_dir / "val.parquet")
    for split, (images, labels) in splits.items():
        x, y = load_split(task_dir, split)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels))
    train = splits["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(m.mean, train.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m.std, train.std(axis=(0, 2, 3)), rtol=1e-9)


def test_sha_mismatch_names_the_file(tiny_task):
    task_dir, _ = tiny_task
    path = task_dir / "val.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val\.parquet: sha256 .* does not match"):
        read_manifest(task_dir)
    assert read_manifest(task_dir, verify=False).counts["val"] == 4
    assert load_split(task_dir, "test")[0].shape == (6, 3, 8, 8)  # only the file read is verified
    with pytest.raises(DataError, match=r"val\.parquet"):
        load_split(task_dir, "val")


def _rehash(task_dir, filename):
    m = read_manifest(task_dir, verify=False)
    files = dict(m.files) | {filename: sha256_file(task_dir / filename)}
    write_manifest(task_dir, type(m)(**{**m.__dict__, "files": files}))


def test_truncated_parquet_is_a_clear_error_even_with_matching_sha(tiny_task):
    task_dir, _ = tiny_task
    path = task_dir / "train.parquet"
    path.write_bytes(path.read_bytes()[:200])
    _rehash(task_dir, "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet: unreadable Parquet file"):
        load_split(task_dir, "train")


def test_row_count_and_label_checks(tiny_task):
    task_dir, _ = tiny_task
    m = read_manifest(task_dir)
    write_manifest(task_dir, type(m)(**{**m.__dict__, "counts": {**m.counts, "test": 7}}))
    with pytest.raises(DataError, match=r"test\.parquet: 6 rows, the manifest says 7"):
        load_split(task_dir, "test")
    write_manifest(task_dir, type(m)(**{**m.__dict__, "num_classes": 2, "class_names": ("a", "b")}))
    with pytest.raises(DataError, match=r"train\.parquet: labels outside 0\.\.1"):
        load_split(task_dir, "train")


def test_bad_manifest_json_and_missing_key(tiny_task):
    task_dir, _ = tiny_task
    path = task_dir / "manifest.json"
    data = json.loads(path.read_text())
    del data["class_names"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"manifest\.json: manifest lacks key 'class_names'"):
        read_manifest(task_dir)
    path.write_text('{"format_version": 1, ')
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        read_manifest(task_dir)
    path.unlink()
    with pytest.raises(DataError, match="manifest not found"):
        load_split(task_dir, "train")


def test_missing_listed_file(tiny_task):
    task_dir, _ = tiny_task
    (task_dir / "test.parquet").unlink()
    with pytest.raises(DataError, match=r"test\.parquet: listed in the manifest but missing"):
        read_manifest(task_dir)


def test_crash_mid_write_leaves_previous_version_and_no_temp(tiny_task):
    task_dir, _ = tiny_task
    before = read_manifest(task_dir).files

    def chunks():
        yield np.zeros((2, 3, 8, 8), np.uint8), np.zeros(2), ["x", "y"]
        raise RuntimeError("killed")

    writer = TaskWriter(task_dir.parent, "tiny", ["a"], 8, description="", augment=AugmentPolicy(),
                        origin="", seed=0, val_fraction=0.1)
    with pytest.raises(RuntimeError, match="killed"), writer:
        writer.write_split("train", chunks())
    assert read_manifest(task_dir).files == before
    assert sorted(p.name for p in task_dir.parent.iterdir()) == ["tiny"]


def test_writer_rejects_bad_labels_and_shapes(tmp_path):
    writer = TaskWriter(tmp_path, "t", ["a", "b"], 4, description="", augment=AugmentPolicy(), origin="",
                        seed=0, val_fraction=0.1)
    with writer:
        with pytest.raises(ValueError, match="label outside 0..1"):
            writer.write_split("train", [(np.zeros((1, 3, 4, 4), np.uint8), np.array([2]), ["o"])])
        with pytest.raises(ValueError, match=r"need uint8 \(n, \*\(3, 4, 4\)\)"):
            writer.write_split("val", [(np.zeros((1, 3, 5, 4), np.uint8), np.array([0]), ["o"])])
        with pytest.raises(ValueError, match="never written"):
            writer.finish()
    assert not (tmp_path / "t").exists()


def test_augment_policy_validation():
    with pytest.raises(ValueError, match="crop='flip'"):
        AugmentPolicy(crop="flip")
    with pytest.raises(ValueError, match="padding >= 1"):
        AugmentPolicy(crop="pad")
    with pytest.raises(ValueError, match="scale_min=0"):
        AugmentPolicy(crop="resized", scale_min=0)


def test_stratified_split_counts_and_determinism():
    labels = np.repeat(np.arange(3), [10, 20, 1])
    kept, carved = stratified_split(labels, 0.2, seed=5)
    assert np.bincount(labels[carved], minlength=3).tolist() == [2, 4, 0]
    assert np.bincount(labels[kept], minlength=3).tolist() == [8, 16, 1]
    assert sorted(np.concatenate([kept, carved]).tolist()) == list(range(31))
    again = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(kept, again[0]) and np.array_equal(carved, again[1])
    with pytest.raises(ValueError, match="fraction=1.0"):
        stratified_split(labels, 1.0, seed=0)


def test_write_task_arrays_requires_all_splits(tmp_path):
    writer = TaskWriter(tmp_path, "t", ["a"], 4, description="", augment=AugmentPolicy(), origin="",
                        seed=0, val_fraction=0.1)
    with writer, pytest.raises(KeyError):
        write_task_arrays(writer, {"train": (np.zeros((1, 3, 4, 4), np.uint8), np.zeros(1), ["o"])})
