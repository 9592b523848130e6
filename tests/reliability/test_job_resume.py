"""A tune job resumes from its last epoch checkpoint (``stages.jobs.checkpoints``): the payload of
a job stopped after epoch k and retried is bit-identical to an uninterrupted run's; a torn
checkpoint falls back to the previous one (or epoch 0) with a warning; a finished job leaves no
checkpoint. And ``runtime.precision``: a bf16 job trains under autocast, its payload stays fp32.
The Ray test kills the worker with the suite's fault injection (``RECAST_FAULT_ONCE_DIR``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import write_stage_files

import stages.jobs.checkpoints as checkpoints
from recast.data.manifest import AugmentPolicy
from recast.data.storage import TaskWriter, write_task_arrays
from recast.io import tensors_sha256
from stages.config.params import MethodParams, RuntimeParams, TrainParams
from stages.jobs.cache import checkpoint_location
from stages.jobs.fanout import run_jobs
from stages.jobs.faults import FAULT_ENV, FAULT_POINT_ENV
from stages.jobs.inputs import InputStore, backbone_bundle, banks_bundle, task_bundle
from stages.jobs.train import dispatch

EPOCHS = 3


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Tiny ViT pretrain + RECAST banks (``faults.write_stage_files``) and a real 5-class task."""
    root = write_stage_files(tmp_path_factory.mktemp("resume") / "project")
    rng = np.random.default_rng(0)
    for name, channel in (("task_r", 0), ("task_s", 1)):
        splits = {}
        for split, n in (("train", 48), ("val", 10), ("test", 10)):
            labels = np.arange(n) % 5
            images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            images[:, channel] = (labels * 50)[:, None, None]  # learnable: one channel says the class
            splits[split] = (images, labels, [f"{split}:{i}" for i in range(n)])
        writer = TaskWriter(root / "data", name, list("abcde"), 32, description="resume test",
                            augment=AugmentPolicy("pad", 4, True), origin="test", seed=0, val_fraction=0.2)
        with writer:
            write_task_arrays(writer, splits)
    return root


def _spec(project: Path, store: InputStore, **extra) -> dict:
    return {"id": "tune/vit/recast/task_r/s0", "arch": "vit", "method_name": "recast",
            "method": MethodParams(kind="recast").model_dump(), "task": "task_r", "seed": 0, "bank_sha": "",
            "train": TrainParams(epochs=EPOCHS, lr=0.02, step_size=2, batch_size=16, image_size=32).model_dump(),
            "device": "cpu", "lr": 0.02,
            "inputs": {"backbone": store.add(backbone_bundle(project / "outputs/pretrain", "vit")),
                       "banks": store.add(banks_bundle(project / "outputs/mimic", "vit")),
                       "task": store.add(task_bundle(project / "data/task_r"))}, **extra}


def _sequential_spec(project: Path, store: InputStore, **extra) -> dict:
    return {"id": "tune/vit/ewc/sequential/s0", "kind": "continual", "arch": "vit", "method_name": "ewc", "seed": 0,
            "lr": 0.01, "options": {}, "task_order": ["task_r", "task_s"],
            "train": TrainParams(epochs=2, lr=0.01, step_size=1, batch_size=16, image_size=32).model_dump(),
            "device": "cpu",
            "inputs": {"backbone": store.add(backbone_bundle(project / "outputs/pretrain", "vit")),
                       **{f"task/{t}": store.add(task_bundle(project / "data" / t)) for t in ("task_r", "task_s")}},
            **extra}


# state_sha256: the digest of the method's whole final state (every weight, head, Fisher, generator)
COMPARED = ("acc_matrix", "final_acc", "val_acc", "avg_acc", "forgetting", "trainable_params", "training_state_bytes",
            "state_sha256")


def _run(spec: dict, store: InputStore) -> tuple[dict, dict]:
    """The job in this process on one thread: (its metrics, its tensors)."""
    torch.set_num_threads(1)
    result = dispatch(spec, store.local(spec["inputs"]))
    return result.metrics, result.tensors


@pytest.fixture(scope="module")
def sequential_reference(project) -> dict:
    store = InputStore()
    meta, tensors = _run(_sequential_spec(project, store), store)
    assert (meta["resumed_task"], meta["resumed_epoch"]) == (0, 0) and tensors == {}
    assert len(meta["state_sha256"]) == 64
    return {k: meta[k] for k in COMPARED}


class Killed(Exception):
    pass


def _raise_at(where: str):
    def fault(job_id: str, point: str) -> None:
        if point == where:
            raise Killed(point)
    return fault


def _kill_after(monkeypatch, k: int) -> None:
    monkeypatch.setattr(checkpoints, "maybe_fault", _raise_at(f"epoch:{k}"))


@pytest.fixture(scope="module")
def reference(project) -> str:
    store = InputStore()
    meta, payload = _run(_spec(project, store), store)  # no checkpoint_dir: never checkpoints
    assert meta["resumed_epoch"] == 0 and meta["precision"] == "fp32"
    return tensors_sha256(payload)


def test_job_stopped_after_epoch_2_resumes_bit_identical_and_cleans_up(project, reference, tmp_path, monkeypatch):
    store = InputStore()
    spec = _spec(project, store, checkpoint_dir=str(tmp_path / "ckpt"))
    _kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        _run(spec, store)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch-1.json", "epoch-1.safetensors", "epoch-2.json", "epoch-2.safetensors"]
    meta, payload = _run(spec, store)  # the retry
    assert meta["resumed_epoch"] == 2
    assert tensors_sha256(payload) == reference
    assert {t.dtype for t in payload.values()} == {torch.float32}
    assert not (tmp_path / "ckpt").exists()  # a finished job deletes its checkpoints


@pytest.mark.parametrize("torn, resumed", [(["epoch-2"], 1), (["epoch-1", "epoch-2"], 0)])
def test_torn_checkpoint_falls_back_with_a_warning(project, reference, tmp_path, monkeypatch, caplog, torn, resumed):
    store = InputStore()
    spec = _spec(project, store, checkpoint_dir=str(tmp_path / "ckpt"))
    _kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        _run(spec, store)
    monkeypatch.setattr(checkpoints, "maybe_fault", lambda job_id, point: None)  # killed once only
    for name in torn:  # a truncated tensor file (a node lost mid-write, a full disk)
        path = tmp_path / "ckpt" / f"{name}.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fallback = "the epoch-1 one" if resumed else "the start"
    meta, payload = _run(spec, store)
    torn_lines = [r.getMessage() for r in caplog.records if "is torn" in r.getMessage()]
    assert len(torn_lines) == len(torn) and re.search(r"epoch-2 is torn .*sha256", torn_lines[0])
    assert torn_lines[-1].endswith(f"falling back to {fallback}")
    assert meta["resumed_epoch"] == resumed
    assert tensors_sha256(payload) == reference


# the sequential job's checkpoints (EWC, 2 tasks of 2 epochs): step-1 task:0:epoch:1, step-2
# task:0:epoch:2, step-3 task:1, step-4 task:1:epoch:1, step-5 task:1:epoch:2, step-6 task:2
def _files(*steps: int) -> list[str]:
    return sorted(f"step-{n}.{ext}" for n in steps for ext in ("json", "safetensors"))


@pytest.mark.parametrize("stop, files, resumed", [("task:1", (2, 3), (1, 0)), ("task:1:epoch:1", (3, 4), (1, 1))])
def test_sequential_job_stopped_resumes_with_the_same_results(project, sequential_reference, tmp_path, monkeypatch,
                                                               caplog, stop, files, resumed):
    """Stopped after task 1, or after epoch 1 of task 1 (of 2): the retry resumes there, logs it,
    and ends in the same state, bit for bit (state_sha256)."""
    store = InputStore()
    spec = _sequential_spec(project, store, checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(checkpoints, "maybe_fault", _raise_at(stop))
    with pytest.raises(Killed):
        _run(spec, store)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == _files(*files)
    monkeypatch.setattr(checkpoints, "maybe_fault", lambda job_id, point: None)
    with caplog.at_level("WARNING", logger="stages.jobs.sequential"):
        meta, _ = _run(spec, store)
    assert (meta["resumed_task"], meta["resumed_epoch"]) == resumed
    assert [r.getMessage() for r in caplog.records if "resumed" in r.getMessage()] == [
        f"{spec['id']}: resumed at task 1 (task_s) epoch {resumed[1]} from its checkpoint"]
    assert {k: meta[k] for k in COMPARED} == sequential_reference
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("torn, resumed", [(["step-4"], (1, 0)), (["step-3", "step-4"], (0, 0))])
def test_torn_mid_task_checkpoint_falls_back_with_a_warning(project, sequential_reference, tmp_path, monkeypatch,
                                                            caplog, torn, resumed):
    """The newest checkpoint (inside task 1) truncated: the job falls back to the one after task 1,
    or, both truncated, to the start; a warning each, the same final state."""
    store = InputStore()
    spec = _sequential_spec(project, store, checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(checkpoints, "maybe_fault", _raise_at("task:1:epoch:1"))
    with pytest.raises(Killed):
        _run(spec, store)
    monkeypatch.setattr(checkpoints, "maybe_fault", lambda job_id, point: None)
    for name in torn:
        path = tmp_path / "ckpt" / f"{name}.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    meta, _ = _run(spec, store)
    torn_lines = [r.getMessage() for r in caplog.records if "is torn" in r.getMessage()]
    assert len(torn_lines) == len(torn) and re.search(r"step-4 is torn .*sha256", torn_lines[0])
    assert torn_lines[-1].endswith("falling back to " + ("the step-3 one" if resumed[0] else "the start"))
    assert (meta["resumed_task"], meta["resumed_epoch"]) == resumed
    assert {k: meta[k] for k in COMPARED} == sequential_reference


def test_bf16_job_trains_under_autocast_and_gives_an_fp32_payload(project, reference):
    store = InputStore()
    meta, payload = _run(_spec(project, store, precision="bf16"), store)
    assert meta["precision"] == "bf16"
    assert {t.dtype for t in payload.values()} == {torch.float32}
    assert tensors_sha256(payload) != reference  # autocast changed the arithmetic
    assert 0.0 <= meta["test_acc"] <= 1.0


@pytest.mark.slow  # a local Ray, its worker killed once
@pytest.mark.timeout(600)
def test_ray_workers_killed_mid_job_are_retried_and_resume(project, reference, sequential_reference, tmp_path,
                                                           monkeypatch):
    """The per-task job loses its worker after epoch 2, the sequential one after epoch 1 of task 1."""
    import ray

    fault_dir = tmp_path / "faults"
    monkeypatch.setenv(FAULT_ENV, str(fault_dir))
    monkeypatch.setenv(FAULT_POINT_ENV, "epoch:2,task:1:epoch:1")
    if ray.is_initialized():
        ray.shutdown()
    rt = RuntimeParams(num_cpus=2, cpus_per_task=1, max_retries=1, cache_dir=str(tmp_path / "cache"),
                       progress=False, inline_jobs=0)
    store = InputStore()
    per_task, sequential = _spec(project, store), _sequential_spec(project, store)
    try:
        done = run_jobs("tune", dispatch, [per_task, sequential], rt, inputs=store)
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    finally:
        ray.shutdown()
    assert sorted(p.name for p in fault_dir.iterdir()) == [
        "tune_vit_ewc_sequential_s0.task1.epoch1.killed", "tune_vit_recast_task_r_s0.epoch2.killed"]
    said = [line for f in logs.glob("worker-*.err") for line in f.read_text(errors="replace").splitlines()
            if "resumed at" in line]  # the retries' own log lines (a worker's stderr)
    assert sorted(said) == [f"{sequential['id']}: resumed at task 1 (task_s) epoch 1 from its checkpoint",
                            f"{per_task['id']}: resumed at epoch 2 from its checkpoint"]
    meta, payload = done[per_task["id"]].metrics, done[per_task["id"]].tensors
    assert meta["resumed_epoch"] == 2  # the retry started at epoch 2, not 0
    assert tensors_sha256(payload) == reference
    meta = done[sequential["id"]].metrics
    assert (meta["resumed_task"], meta["resumed_epoch"]) == (1, 1)  # inside task 1, not from its start
    assert {k: meta[k] for k in COMPARED} == sequential_reference  # state_sha256 included
    assert not any(Path(checkpoint_location(rt, "tune", s)).exists() for s in (per_task, sequential))
    assert os.environ[FAULT_POINT_ENV] == "epoch:2,task:1:epoch:1"


def test_checkpoints_under_a_storage_uri_keep_the_two_newest_and_clear(tmp_path):
    """``runtime.storage`` set: a job's checkpoints live under ``<storage>/checkpoints/<stage>/<key>``
    (here a file:// URI, read through pyarrow.fs as s3:// or gs:// would be)."""
    rt = RuntimeParams(storage=f"file://{tmp_path}/shared", cache_dir=str(tmp_path / "cache"))
    location = checkpoint_location(rt, "tune", {"id": "x", "seed": 0})
    assert location.startswith(f"file://{tmp_path}/shared/checkpoints/tune/")
    saved = []
    store = checkpoints.JobCheckpoints(location, after_save=saved.append)
    assert store.load() is None
    for epoch in (1, 2, 3):
        store.save({"w": torch.full((2,), float(epoch))}, {"epoch": epoch})
    folder = Path(location.removeprefix("file://"))
    assert saved == ["epoch:1", "epoch:2", "epoch:3"] and sorted(p.name for p in folder.iterdir()) == [
        "epoch-2.json", "epoch-2.safetensors", "epoch-3.json", "epoch-3.safetensors"]
    tensors, meta = store.load()
    assert meta == {"epoch": 3} and torch.equal(tensors["w"], torch.full((2,), 3.0))
    store.clear()
    assert not folder.exists() and store.load() is None
