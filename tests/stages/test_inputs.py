"""Job inputs (stages.jobs.inputs): bundles named by content, moved through a storage URI or read
locally, decoded into the same batches and backbones the path-based readers give."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from recast.data import AugmentPolicy, BatchLoader, DataError
from recast.data.storage import TaskWriter, write_task_arrays
from stages.config.common import ParamsError, validate_section
from stages.config.params import RuntimeParams
from stages.jobs.backbones import load_backbone, save_pretrained
from stages.jobs.inputs import InputStore, JobInputs, backbone_bundle, task_bundle
from stages.jobs.runtime import job_device


def write_task(out: Path, name: str = "tiny") -> Path:
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 40), ("val", 12), ("test", 12)):
        images = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
        labels = rng.integers(0, 3, n)
        splits[split] = (images, labels, [f"{split}:{i}" for i in range(n)])
    with TaskWriter(out, name, ["a", "b", "c"], 8, description="test", augment=AugmentPolicy("pad", 2, True),
                    origin="test", seed=0, val_fraction=0.1) as writer:
        write_task_arrays(writer, splits)
    return out / name


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_task_from_bytes_gives_the_batches_of_the_files(tmp_path: Path) -> None:
    task_dir = write_task(tmp_path / "a")
    store = InputStore()
    key = store.add(task_bundle(task_dir))
    data = store.local({"task": key}).task("task")
    for split, train in (("train", True), ("test", False)):
        want = batches(BatchLoader(task_dir, split, 16, 12, train=train, seed=3, limit=30))
        got = batches(data.loader(split, 16, 12, train=train, seed=3, limit=30))
        assert len(got) == len(want) == (2 if split == "train" else 1)
        for (x, y), (x2, y2) in zip(got, want):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    # a copied project names the same content with the same key (the cache is reused)
    copy = tmp_path / "b" / "tiny"
    shutil.copytree(task_dir, copy)
    assert InputStore().add(task_bundle(copy)) == key and key.startswith("task-")


def test_corrupt_bytes_are_caught_on_the_job_side(tmp_path: Path) -> None:
    task_dir = write_task(tmp_path)
    store = InputStore()
    key = store.add(task_bundle(task_dir))
    payload = store.bundles[key].read()
    payload["train.parquet"] = payload["train.parquet"].copy()
    payload["train.parquet"][-100] ^= 0xFF
    data = JobInputs({"task": key}, {key: payload}).task("task")
    with pytest.raises(DataError, match=r"tiny/train.parquet: sha256 .* does not match"):
        data.loader("train", 8, 8, train=True, seed=0)
    other = write_task(tmp_path / "other", "other")
    with pytest.raises(DataError, match="received bundle has digest"):  # the wrong bundle for the key
        JobInputs({"task": key}, {key: task_bundle(other).read()})


def test_storage_uri_uploads_once_and_jobs_read_it(tmp_path: Path) -> None:
    task_dir = write_task(tmp_path / "data")
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    save_pretrained(tmp_path / "pretrain", "vit", model.state_dict(),
                    {"model": "test_vit", "kwargs": {"img_size": 32}, "num_classes": 3})
    store = InputStore(f"file://{tmp_path / 'shared'}")
    roles = {"task": store.add(task_bundle(task_dir)), "backbone": store.add(backbone_bundle(tmp_path / "pretrain", "vit"))}
    refs = store.refs([{"id": "j", "inputs": roles}])
    assert refs == {k: f"file://{tmp_path / 'shared'}/{k}" for k in roles.values()}
    uploaded = sorted(p.relative_to(tmp_path / "shared").as_posix() for p in (tmp_path / "shared").rglob("*.*"))
    assert uploaded == sorted([f"{roles['task']}/{n}" for n in ("manifest.json", "train.parquet", "val.parquet",
                                                                 "test.parquet")]
                              + [f"{roles['backbone']}/{n}" for n in ("meta.json", "state.safetensors")])
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "shared").rglob("*.*")}
    again = InputStore(store.storage)
    again.add(task_bundle(task_dir))
    again.add(backbone_bundle(tmp_path / "pretrain", "vit"))
    again.refs([{"id": "j", "inputs": roles}])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shared").rglob("*.*")} == mtimes  # not uploaded again

    inputs = JobInputs.fetch(roles, refs)
    want = load_backbone("vit", tmp_path / "pretrain")
    got = inputs.backbone("backbone")
    assert (got.model_name, got.model_kwargs, got.num_classes) == (want.model_name, want.model_kwargs, 3)
    assert got.state.keys() == want.state.keys() and all(torch.equal(got.state[k], want.state[k]) for k in want.state)
    x, y = next(iter(inputs.task("task").loader("val", 12, 8, train=False, seed=0)))
    x2, y2 = next(iter(BatchLoader(task_dir, "val", 12, 8, train=False, seed=0)))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(KeyError, match="never added"):
        InputStore(store.storage).refs([{"id": "j", "inputs": roles}])


@pytest.mark.parametrize(("value", "ok"), [(0.0, True), (0.25, True), (1.0, True), (2.0, True), (1.5, False)])
def test_gpus_per_task_follows_rays_rule(value: float, ok: bool) -> None:
    data = {"runtime": {"gpus_per_task": value}}
    if ok:
        rt = validate_section("runtime", RuntimeParams, data)
        assert job_device(rt) == ("cuda" if value > 0 else "cpu")
    else:
        with pytest.raises(ParamsError, match=r"runtime.gpus_per_task: .*fraction of one GPU"):
            validate_section("runtime", RuntimeParams, data)


def test_storage_and_device_are_validated() -> None:
    with pytest.raises(ParamsError, match=r"runtime.storage: .*'hdfs://x'.*s3://"):
        validate_section("runtime", RuntimeParams, {"runtime": {"storage": "hdfs://x"}})
    with pytest.raises(ParamsError, match="device 'cuda' needs gpus_per_task > 0"):
        validate_section("runtime", RuntimeParams, {"runtime": {"device": "cuda"}})
