"""The served model's test store, shared by ``test_serving.py`` (in process) and
``test_serving_http.py`` (through ``mlflow models serve``): a tiny ViT's stage files, payloads
of tasks a (3 classes) and b (5) registered, a payload 'other' made on other banks, prepared
tasks a (stored 32 x 32) and b (stored 24 x 24, resized by its transform) with test splits,
and the served model built from them in a temporary sqlite store (no pipeline run)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

import recast
from helpers import free_port
from recast.data.manifest import AugmentPolicy
from recast.data.storage import TaskWriter, write_task_arrays
from recast.io import save_payload
from stages.config.params import MimicArch
from stages.jobs.backbones import load_backbone, save_mimicked, save_pretrained

VIT = {"model": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8, "global_pool": "avg"}}
CLASSES = {"a": 3, "b": 5}
STORED_SIDE = {"a": 32, "b": 24}
TEST_ROWS = 24
MAX_ROWS = 40  # the built model's row limit (the default is DEFAULT_MAX_ROWS)
REPO = Path(__file__).resolve().parents[2]


def banks(root: Path, seed: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(VIT["model"], pretrained=False, num_classes=10, **VIT["kwargs"]).eval()
    save_pretrained(root / "pretrain", "vit", model.state_dict(), {**VIT, "num_classes": 10, "source": "train"})
    cfg = MimicArch(preset="recast_att_mlp", overrides={"groups": 3}).recast_config()
    rc = recast.apply(model, cfg, seed=seed)
    save_mimicked(root / "mimic", "vit", cfg, seed, {k: b.templates.detach() for k, b in rc.banks.items()},
                  rc.task_tensors(cfg.base_task))


def payload(rc, task: str, n: int, out: Path, seed: int) -> Path:
    rc.add_task(task, num_classes=n)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rc.task_parameters(task):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    save_payload(rc, task, out / task / f"{task}-s42")
    return out / task


def register(folder: Path, task: str) -> None:
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


def prepare(out: Path, task: str) -> Path:
    """A prepared task of smooth random images (so a resize changes them little) at its stored side."""
    rng = np.random.default_rng(len(task) + STORED_SIDE[task])
    side, splits = STORED_SIDE[task], {}
    for split, n in (("train", 32), ("val", 8), ("test", TEST_ROWS)):
        coarse = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
        smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(side, side), mode="bilinear")
        images = smooth.round().clamp(0, 255).to(torch.uint8).numpy()  # (n, 3, side, side)
        splits[split] = (images, rng.integers(0, CLASSES[task], n), [f"{split}:{i}" for i in range(n)])
    with TaskWriter(out, task, [f"c{i}" for i in range(CLASSES[task])], side, description="test", augment=AugmentPolicy(),
                    origin="test", seed=0, val_fraction=0.1) as writer:
        write_task_arrays(writer, splits)
    return out / task


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Stage files of a tiny ViT, payloads of tasks a (3 classes) and b (5) registered, a payload
    'other' made on other banks, prepared tasks a and b; the reference model holds a and b."""
    root = tmp_path_factory.mktemp("serving")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    old_cache = os.environ.get("RECAST_PAYLOAD_CACHE")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["RECAST_PAYLOAD_CACHE"] = str(root / "payload-cache")  # not the user's ~/.cache
    banks(root, seed=0)
    rc = load_backbone("vit", root / "pretrain", root / "mimic").recast()
    for i, (task, n) in enumerate(CLASSES.items()):
        register(payload(rc, task, n, root / "payloads", seed=i + 1), task)
    banks(root / "other", seed=5)  # same backbone, other banks
    rc_other = load_backbone("vit", root / "other" / "pretrain", root / "other" / "mimic").recast()
    register(payload(rc_other, "other", 4, root / "payloads", seed=9), "other")
    for task in CLASSES:
        prepare(root / "prepared", task)
    yield SimpleNamespace(root=root, rc=rc.eval(), uri=os.environ["MLFLOW_TRACKING_URI"], data=root / "prepared")
    for key, value in (("MLFLOW_TRACKING_URI", old), ("RECAST_PAYLOAD_CACHE", old_cache)):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
    v2 = build("vit", "recast", store.root / "pretrain", store.root / "mimic", 32, tasks=["a", "b"], data_dir=store.data,
               max_rows=MAX_ROWS)
    again = build("vit", "recast", store.root / "pretrain", store.root / "mimic", 32, tasks=["a", "b"],
                  data_dir=store.data, max_rows=MAX_ROWS)
    assert (again["version"], again["unchanged"], v2["unchanged"]) == ("2", True, False)  # nothing new: no version
    client = mlflow.MlflowClient(store.uri)
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'recast-serve.vit.recast'")) == ["1", "2"]
    return v1, v2


def served_model(store):
    """The current version loaded as a user loads it: ``mlflow.pyfunc.load_model`` (its schema enforced)."""
    import mlflow

    model = mlflow.pyfunc.load_model("models:/recast-serve.vit.recast@current")
    return model, model.unwrap_python_model()


def rows(n_per_task: int = 3, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tasks = [t for _ in range(n_per_task) for t in ("b", "a")]  # interleaved
    return tasks, torch.randn(len(tasks), 3, 32, 32, generator=gen)


def frame(tasks, x) -> pd.DataFrame:
    return pd.DataFrame({"task": tasks, "image": [row.reshape(-1).tolist() for row in x]})


def per_task(rc, tasks, x) -> tuple[list[int], list[list[float]]]:
    classes, probs = [], []
    with torch.no_grad():
        for t, row in zip(tasks, x):
            rc.set_task(t, freeze=False)
            p = torch.softmax(rc(row[None])[0], dim=0)
            classes.append(int(p.argmax()))
            probs.append(p.tolist())
    return classes, probs


def check(out_classes, out_probs, want) -> None:
    classes, probs = want
    assert list(out_classes) == classes
    for got, want in zip(out_probs, probs):
        assert len(got) == len(want)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5




@contextlib.contextmanager
def mlflow_serve(store, workers: int = 1) -> Iterator[str]:
    """``mlflow models serve`` of the current version on 127.0.0.1 (a fresh process, the venv's
    bin first on PATH: mlflow execs ``uvicorn`` by name); yields its base URL, kills it after."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/recast-serve.vit.recast@current",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    log_path = store.root / f"serve.{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=store.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    """(HTTP status, parsed JSON answer) of a POST of ``body`` to ``url``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_file(pixels: np.ndarray, fmt: str) -> bytes:
    """uint8 pixels (C, H, W) as the bytes of a ``fmt`` file (PNG, JPEG, GIF)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buf, format=fmt)
    return buf.getvalue()


def records(pairs) -> dict:
    return {"dataframe_records": [{"task": t, "image": v} for t, v in pairs]}


def as_frame(body: dict) -> pd.DataFrame:
    """A request body as the DataFrame the scoring server hands ``predict``."""
    if "dataframe_split" in body:
        return pd.DataFrame(body["dataframe_split"]["data"], columns=body["dataframe_split"]["columns"])
    return pd.DataFrame(body["dataframe_records"])


def bad_requests(x: torch.Tensor) -> list[tuple[str, list[str], dict]]:
    """Per refused input: (error class, words its message must hold, the request body)."""
    flat = x[0].reshape(-1).tolist()
    nan, inf = list(flat), list(flat)
    nan[5], inf[7], inf[9] = float("nan"), float("inf"), float("-inf")
    small = np.zeros((3, 8, 8), np.uint8)
    return [
        ("UnknownServedTaskError", ["unknown task 'zz'", "serves the tasks ['a', 'b']"], records([("a", flat), ("zz", flat)])),
        ("ImageShapeError", ["row 1", "[100]", "[3, 32, 32]", "3072"], records([("a", flat), ("b", flat[:100])])),
        ("ImageValueError", ["row 0", "1 non-finite"], records([("a", nan)])),
        ("ImageValueError", ["row 1", "2 non-finite"], records([("a", flat), ("b", inf)])),
        ("ImageDtypeError", ["row 0", "flat list of integers", "H x W x 3"], records([("a", [0] * 3072)])),
        ("ImageDtypeError", ["row 0", "<U3", "not strings"], records([("a", ["1e3"] * 3072)])),
        ("ImageValueError", ["row 0", "300", "0..255"], records([("a", [[[300, 0, 0]]])])),
        ("ImageShapeError", ["row 0", "[2, 2, 4]", "H x W x 3"], records([("a", [[[0] * 4] * 2] * 2)])),
        ("ImageShapeError", ["row 0", "ragged"], records([("a", [[1.5, 2.5], [3.5]])])),
        ("ImageShapeError", ["row 1", "no image"], {"dataframe_records": [{"task": "a", "image": flat}, {"task": "b"}]}),
        ("ImageDecodeError", ["row 1", "cannot decode"], records([("a", flat), ("b", b64(b"not an image at all"))])),
        ("ImageDecodeError", ["row 0", "not base64"], records([("a", "%%% not base64 %%%")])),
        ("ImageDecodeError", ["row 0", "['PNG', 'JPEG']", "GIF"], records([("a", b64(image_file(small, "GIF")))])),
        ("EmptyBatchError", ["empty batch"], {"dataframe_split": {"columns": ["task", "image"], "data": []}}),
        ("RowLimitError", [f"{MAX_ROWS + 1} rows", f"at most {MAX_ROWS} rows"],
         records([("a", [[[0, 0, 0]]])] * (MAX_ROWS + 1))),
    ]
