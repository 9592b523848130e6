"""The served model (stages.serving): banks + registered payloads as an MLflow pyfunc model,
built in a temporary sqlite store from library-made files (no pipeline run), loaded from a
fresh process, served over HTTP by ``mlflow models serve --env-manager local``, and refusing
bad input with named errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import recast
from recast.io import save_payload
from stages.config.params import MimicArch
from stages.jobs.backbones import load_backbone, save_mimicked, save_pretrained

VIT = {"model": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8, "global_pool": "avg"}}
CLASSES = {"a": 3, "b": 5}
REPO = Path(__file__).resolve().parents[2]


def _banks(root: Path, seed: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(VIT["model"], pretrained=False, num_classes=10, **VIT["kwargs"]).eval()
    save_pretrained(root / "pretrain", "vit", model.state_dict(), {**VIT, "num_classes": 10, "source": "train"})
    cfg = MimicArch(preset="recast_att_mlp", overrides={"groups": 3}).recast_config()
    rc = recast.apply(model, cfg, seed=seed)
    save_mimicked(root / "mimic", "vit", cfg, seed, {k: b.templates.detach() for k, b in rc.banks.items()},
                  rc.task_tensors(cfg.base_task))


def _payload(rc, task: str, n: int, out: Path, seed: int) -> Path:
    rc.add_task(task, num_classes=n)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rc.task_parameters(task):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    save_payload(rc, task, out / task / f"{task}-s42")
    return out / task


def _register(folder: Path, task: str) -> None:
    from stages.tracking.payloads import register_payload
    from stages.tracking.store import artifact_location, make_client

    client = make_client()
    exp = client.get_experiment_by_name("payloads") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("payloads",
                                                                    artifact_location=artifact_location(client.tracking_uri))
    rid = client.create_run(exp_id).info.run_id
    client.log_artifacts(rid, str(folder), "payload")
    client.set_terminated(rid)
    register_payload(rid, "vit", task, "recast", tags={})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Stage files of a tiny ViT, payloads of tasks a (3 classes) and b (5) registered, and a
    payload 'other' made on other banks; the reference model holds a and b (set_task)."""
    root = tmp_path_factory.mktemp("serving")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    _banks(root, seed=0)
    rc = load_backbone("vit", root / "pretrain", root / "mimic").recast()
    for i, (task, n) in enumerate(CLASSES.items()):
        _register(_payload(rc, task, n, root / "payloads", seed=i + 1), task)
    _banks(root / "other", seed=5)  # same backbone, other banks
    rc_other = load_backbone("vit", root / "other" / "pretrain", root / "other" / "mimic").recast()
    _register(_payload(rc_other, "other", 4, root / "payloads", seed=9), "other")
    yield SimpleNamespace(root=root, rc=rc.eval(), uri=os.environ["MLFLOW_TRACKING_URI"])
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def built(store):
    """Version 1 serves a only; version 2 (alias current) serves a and b. Version 1 is built
    while mlflow's process-wide URIs name a stale store (as an earlier test or a user's
    ``mlflow.set_tracking_uri`` leaves them): the build must use the configured store and put
    the stale globals back untouched."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from stages.serving.build import build

    stale = f"sqlite:///{store.root / 'stale.db'}"
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri, os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(stale)
    os.environ["MLFLOW_TRACKING_URI"] = store.uri  # the variable is ours again; mlflow's global is not
    try:
        v1 = build("vit", "recast", store.root / "pretrain", store.root / "mimic", 32, tasks=["a"])
        assert (tracking_utils._tracking_uri, registry_utils._registry_uri) == (stale, saved[1])
        assert os.environ["MLFLOW_TRACKING_URI"] == store.uri
        assert os.environ.get("MLFLOW_REGISTRY_URI") == saved[2]
    finally:
        mlflow.set_tracking_uri(saved[0])
        os.environ["MLFLOW_TRACKING_URI"] = store.uri
    v2 = build("vit", "recast", store.root / "pretrain", store.root / "mimic", 32, tasks=["a", "b"])
    again = build("vit", "recast", store.root / "pretrain", store.root / "mimic", 32, tasks=["a", "b"])
    assert (again["version"], again["unchanged"], v2["unchanged"]) == ("2", True, False)  # nothing new: no version
    client = mlflow.MlflowClient(store.uri)
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'recast-serve.vit.recast'")) == ["1", "2"]
    return v1, v2


def _rows(n_per_task: int = 3, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tasks = [t for _ in range(n_per_task) for t in ("b", "a")]  # interleaved
    return tasks, torch.randn(len(tasks), 3, 32, 32, generator=gen)


def _frame(tasks, x) -> pd.DataFrame:
    return pd.DataFrame({"task": tasks, "image": [row.reshape(-1).tolist() for row in x]})


def _expected(rc, tasks, x) -> tuple[list[int], list[list[float]]]:
    classes, probs = [], []
    with torch.no_grad():
        for t, row in zip(tasks, x):
            rc.set_task(t, freeze=False)
            p = torch.softmax(rc(row[None])[0], dim=0)
            classes.append(int(p.argmax()))
            probs.append(p.tolist())
    return classes, probs


def _check(out_classes, out_probs, expected) -> None:
    classes, probs = expected
    assert list(out_classes) == classes
    for got, want in zip(out_probs, probs):
        assert len(got) == len(want)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


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
    tasks, x = _rows()
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
    _check(out["class"], out["probabilities"], _expected(store.rc, tasks, x))


@pytest.fixture(scope="module")
def served(store, built):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/recast-serve.vit.recast@current")
    return model, model.unwrap_python_model()


def test_in_process_predictions_equal_the_per_task_model(store, served):
    model, _ = served
    tasks, x = _rows(4, seed=1)
    out = model.predict(_frame(tasks, x))
    assert list(out["task"]) == tasks
    _check(out["class"], out["probabilities"], _expected(store.rc, tasks, x))


def _snapshot(inner) -> dict:
    return {"active": inner.rc.active_task, "tasks": list(inner.rc.tasks), "state": {
        k: v.clone() for k, v in inner.rc.state_dict().items()}}


def _unchanged(before: dict, inner) -> None:
    after = _snapshot(inner)
    assert after["active"] == before["active"] and after["tasks"] == before["tasks"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())


def test_bad_input_named_errors_and_nothing_changed(served):
    from stages.serving.pyfunc import EmptyBatchError, ImageDtypeError, ImageShapeError, UnknownServedTaskError

    model, inner = served
    tasks, x = _rows(1)
    good = inner.predict(None, _frame(tasks, x))
    before = _snapshot(inner)
    cases = [
        (UnknownServedTaskError, ["unknown task 'zz'", "['a', 'b']"], _frame(["a", "zz"], x)),
        (ImageShapeError, ["row 1", "[3, 32, 32]", "3072"],
         pd.DataFrame({"task": ["a", "b"], "image": [x[0].reshape(-1).tolist(), x[1].reshape(-1)[:100].tolist()]})),
        (ImageDtypeError, ["row 0", "float"],
         pd.DataFrame({"task": ["a"], "image": [np.zeros(3072, dtype=np.int64)]})),
        (ImageDtypeError, ["row 0", "floating-point", "<U3"], pd.DataFrame({"task": ["a"], "image": ["abc"]})),
        (EmptyBatchError, ["empty batch"], pd.DataFrame({"task": pd.Series([], dtype=str),
                                                          "image": pd.Series([], dtype=object)})),
    ]
    for cls, words, frame in cases:
        with pytest.raises(cls) as err:
            inner.predict(None, frame)
        assert all(w in str(err.value) for w in words), (cls, str(err.value))
        _unchanged(before, inner)
    again = inner.predict(None, _frame(tasks, x))
    assert again["class"].tolist() == good["class"].tolist()


def test_a_payload_of_other_banks_is_refused_at_build_and_at_load(store, built):
    import mlflow
    from stages.serving.build import build
    from stages.serving.pyfunc import BankMismatchError, RecastServed

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_models_serve_answers_a_mixed_request(store, built):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           # the venv's bin first: mlflow execs ``uvicorn`` by name, also when the venv is not activated
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/recast-serve.vit.recast@current",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = open(store.root / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=store.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (store.root / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, (store.root / "serve.log").read_text()[-3000:]
            time.sleep(1)
        tasks, x = _rows(3, seed=2)
        frame = _frame(tasks, x)
        body = {"dataframe_split": {"columns": ["task", "image"], "data": frame.values.tolist()}}
        status, out = _post(f"http://127.0.0.1:{port}/invocations", body)
        assert status == 200, out
        rows = out["predictions"]
        assert [r["task"] for r in rows] == tasks
        _check([r["class"] for r in rows], [r["probabilities"] for r in rows], _expected(store.rc, tasks, x))
        status, out = _post(f"http://127.0.0.1:{port}/invocations",
                            {"dataframe_records": [{"task": "zz", "image": x[0].reshape(-1).tolist()}]})
        assert 400 <= status < 600 and "unknown task 'zz'" in json.dumps(out) and "['a', 'b']" in json.dumps(out), out
        status, out = _post(f"http://127.0.0.1:{port}/invocations",
                            {"dataframe_records": [{"task": "a", "image": x[0].reshape(-1)[:10].tolist()}]})
        assert 400 <= status < 600 and "[3, 32, 32]" in json.dumps(out), (status, out)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()
