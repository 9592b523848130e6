"""The served model (stages.serving) in process: banks + registered payloads as an MLflow pyfunc
model, built in a temporary sqlite store from library-made files (``serving_store``), loaded
from a fresh process, taking floats, uint8 pixels and PNG/JPEG images, and refusing bad input
with named errors (over HTTP: ``test_serving_http.py``)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from serving_store import (  # noqa: F401
    as_frame,
    b64,
    bad_requests,
    built,
    check,
    frame,
    image_file,
    per_task,
    rows,
    served_model,
    store,
)


@pytest.fixture(scope="module")
def served(store, built):
    return served_model(store)


def test_versions_reference_the_banks_never_copy_them(store, built):
    import mlflow

    from stages.serving.build import EXPERIMENT

    v1, v2 = built
    assert (v1["version"], v2["version"]) == ("1", "2")
    assert v1["config"]["base_uri"] == v2["config"]["base_uri"]  # the same base run, logged once
    assert list(v2["config"]["payloads"]) == ["a", "b"]
    assert v2["config"]["payloads"]["a"] == v1["config"]["payloads"]["a"] == "models:/recast.vit.recast.a/1"
    client = mlflow.MlflowClient(store.uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    bases = client.search_runs([exp], "tags.`mlflow.runName` = 'base.vit'")
    assert len(bases) == 1
    for v in (v1, v2):  # a version's artifacts: config + code, no tensor file
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/recast-serve.vit.recast/{v['version']}",
                                                         dst_path=str(store.root / f"dl{v['version']}")))
        assert sorted(p.name for p in local.rglob("*.safetensors")) == []
        outside_code = sum(p.stat().st_size for p in local.rglob("*") if p.is_file() and "code" not in p.parts)
        assert outside_code < 20_000, outside_code
    serving = client.get_experiment_by_name(EXPERIMENT).artifact_location  # beside the store, not ./mlruns
    assert serving == (store.root / "mlartifacts").as_uri()
    for v in (v1, v2):  # the logged model's files too
        source = client.get_model_version("recast-serve.vit.recast", v["version"]).source
        assert client.get_logged_model(source.split("/")[-1]).artifact_location.startswith(serving), source
    banks = store.root / "mimic" / "vit" / "banks.safetensors"
    assert banks.stat().st_size > 20_000  # what a copy would add per version


def test_fresh_process_load_and_predict(store, built):
    tasks, x = rows()
    np.save(store.root / "x.npy", x.numpy())
    code = ("import json, sys, numpy as np, pandas as pd, mlflow\n"
            "m = mlflow.pyfunc.load_model('models:/recast-serve.vit.recast@current')\n"
            f"x = np.load({str(store.root / 'x.npy')!r})\n"
            f"df = pd.DataFrame({{'task': {tasks!r}, 'image': [r.reshape(-1).tolist() for r in x]}})\n"
            "out = m.predict(df)\n"
            "print(json.dumps({'class': out['class'].tolist(), 'probabilities': [list(p) for p in out['probabilities']]}))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=store.root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    check(out["class"], out["probabilities"], per_task(store.rc, tasks, x))


def test_in_process_predictions_equal_the_per_task_model(store, served):
    model, _ = served
    tasks, x = rows(4, seed=1)
    out = model.predict(frame(tasks, x))
    assert list(out["task"]) == tasks
    check(out["class"], out["probabilities"], per_task(store.rc, tasks, x))


def _snapshot(inner) -> dict:
    return {"active": inner.rc.active_task, "tasks": list(inner.rc.tasks), "state": {
        k: v.clone() for k, v in inner.rc.state_dict().items()}}


def _unchanged(before: dict, inner) -> None:
    after = _snapshot(inner)
    assert after["active"] == before["active"] and after["tasks"] == before["tasks"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())


def test_bad_input_named_errors_and_nothing_changed(served):
    """Every refused input raises its named RequestError (an MlflowException with the client
    code INVALID_PARAMETER_VALUE, HTTP 400), through the user's ``model.predict``; it pickles with
    its arguments, and the model is unchanged."""
    from stages.serving import errors

    model, inner = served
    tasks, x = rows(1)
    good = model.predict(frame(tasks, x))
    before = _snapshot(inner)
    cases = bad_requests(x)
    assert len(cases) == 15
    for name, words, body in cases:
        with pytest.raises(getattr(errors, name)) as err:
            model.predict(as_frame(body))
        assert all(w in err.value.message for w in words), (name, err.value.message)
        assert (err.value.error_code, err.value.get_http_status_code()) == ("INVALID_PARAMETER_VALUE", 400)
        again = pickle.loads(pickle.dumps(err.value))
        assert (type(again), again.message, again.error_code) == (type(err.value), err.value.message, "INVALID_PARAMETER_VALUE")
        _unchanged(before, inner)
    again = model.predict(frame(tasks, x))
    assert again["class"].tolist() == good["class"].tolist()


def test_pixels_and_encoded_images_go_through_the_tasks_transform(store, served):
    """uint8 pixels (H x W x C lists), PNG and JPEG (base64) give what the float input gives for
    the same pixels through the task's evaluation transform (recast.data.transform_batch with the
    prepared manifest's mean and std); b is stored at 24 px, so its rows are resized to 32."""
    from recast.data import read_manifest, transform_batch
    from recast.data.storage import load_split

    model, _ = served
    tasks, pixels = [], []
    for task in ("a", "b"):
        images, _ = load_split(store.data / task, "test", verify=False)
        tasks += [task] * 3
        pixels += [images[i] for i in range(3)]
    floats = []
    for t, p in zip(tasks, pixels):
        m = read_manifest(store.data / t, verify=False)
        floats.append(transform_batch(p[None], 32, m.mean, m.std)[0])
    want = model.predict(frame(tasks, torch.stack(floats)))
    hwc = [p.permute(1, 2, 0).tolist() for p in pixels]  # (C, H, W) -> (H, W, C) nested lists of ints
    png = [b64(image_file(p.numpy(), "PNG")) for p in pixels]
    for form in (hwc, png, ["data:image/png;base64," + s for s in png]):
        out = model.predict(pd.DataFrame({"task": tasks, "image": form}))
        assert out["class"].tolist() == want["class"].tolist()
        assert max(np.abs(np.subtract(g, w)).max() for g, w in zip(out["probabilities"], want["probabilities"])) <= 1e-6
    jpeg = model.predict(pd.DataFrame({"task": tasks, "image": [b64(image_file(p.numpy(), "JPEG")) for p in pixels]}))
    assert [len(p) for p in jpeg["probabilities"]] == [3, 3, 3, 5, 5, 5]  # lossy: answered, not compared
    assert {(r.shape[0], r.shape[1]) for r in pixels} == {(3, 32), (3, 24)}


def test_encoded_images_give_the_loaders_tensors(store, tmp_path):
    """The stored test files sent as images give exactly the evaluate loader's tensors: a raw
    task's rows as PNG (stored 24 px, resized to 32), and a jpeg-stored task's own JPEG files
    (stored 64 px, decoded at half scale as its loader does: ``jpeg_side`` 32)."""
    from recast.data import AugmentPolicy, BatchLoader
    from recast.data.storage import TaskWriter, write_task_arrays
    from stages.serving.build import task_transforms
    from stages.serving.example import encoded_images
    from stages.serving.inputs import TaskTransform, row_tensor

    rng = np.random.default_rng(3)
    splits = {s: (rng.integers(0, 256, (6, 3, 64, 64), dtype=np.uint8), np.arange(6) % 2, [""] * 6)
              for s in ("train", "val", "test")}
    with TaskWriter(tmp_path, "j", ["x", "y"], 64, description="jpeg", augment=AugmentPolicy(), origin="test", seed=0,
                    val_fraction=0.1, encoding="jpeg") as writer:
        write_task_arrays(writer, splits)
    cfg = {**task_transforms(store.data, ["b"], 32), **task_transforms(tmp_path, ["j"], 32)}
    assert ("jpeg_side" in cfg["b"], cfg["j"]["jpeg_side"]) == (False, 32)
    for task, root in (("b", store.data), ("j", tmp_path)):
        x, _ = next(iter(BatchLoader(root / task, "test", 256, 32, train=False, seed=0)))
        files, _ = encoded_images(root / task, "test")
        transform = TaskTransform(tuple(cfg[task]["mean"]), tuple(cfg[task]["std"]), cfg[task].get("jpeg_side"))
        got = torch.stack([row_tensor(b64(f), i, (3, 32, 32), transform) for i, f in enumerate(files)])
        assert got.shape == x.shape == (len(files), 3, 32, 32)
        assert torch.equal(got, x), (task, (got - x).abs().max())


def test_a_payload_of_other_banks_is_refused_at_build_and_at_load(store, built):
    import mlflow

    from stages.serving.build import build
    from stages.serving.errors import BankMismatchError
    from stages.serving.pyfunc import RecastServed

    client = mlflow.MlflowClient(store.uri)
    before = len(client.search_model_versions("name = 'recast-serve.vit.recast'"))
    with pytest.raises(BankMismatchError) as err:
        build("vit", "recast", store.root / "pretrain", store.root / "mimic", 32, tasks=["a", "other"])
    assert "'other'" in str(err.value) and built[1]["config"]["bank_sha256"][:12] in str(err.value)
    assert len(client.search_model_versions("name = 'recast-serve.vit.recast'")) == before  # nothing registered
    cfg = {**built[1]["config"], "payloads": {"a": "models:/recast.vit.recast.a/1",
                                              "other": "models:/recast.vit.recast.other/1"}}
    served = RecastServed()
    with pytest.raises(BankMismatchError, match="'other'"):
        served.load_context(SimpleNamespace(model_config=cfg))
    assert not hasattr(served, "rc")  # nothing half-built
