"""Issue 31's serving comparison (``python -m benchmarks.bench_serving --compare``): T served tasks
of the default suite's ViT (``test_vit`` at 32 px, random weights and payloads), task popularity
Zipf(1.1), ``--clients`` concurrent clients each sending ``--requests`` requests of ``--rows``
base64 PNG rows of ONE task, against

- (a) ``mlflow models serve`` of the version (one uvicorn worker, as ``infra/`` runs it);
- (b) Ray Serve with cross-task batching (``stages.serving.ray_app``: one replica, one forward
  per gathered batch of requests of any tasks);
- (c) Ray Serve multiplexing (``RecastMultiplexed`` below, the ecosystem's way): one RecastModel
  per task id loaded on demand (``@serve.multiplexed(max_num_models_per_replica=8)``, an LRU of
  whole models), ``@serve.batch`` splitting each batch by model id; the request carries its task
  in the ``serve_multiplexed_model_id`` header.

Every answer is compared with the pyfunc model's ``predict`` (wrong = another class or a
probability off by > 1e-5). Rows/s over the wall time of all clients; p50/p99 request latency.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from benchmarks.concurrent import released_together
from stages.jobs.backbones import load_backbone

MODEL_ID_HEADER = "serve_multiplexed_model_id"


@serve.deployment(max_ongoing_requests=64)
class RecastMultiplexed:
    """Ray Serve multiplexing of the same registered version: one whole RecastModel per task."""

    def __init__(self, model_uri: str, tracking_uri: str):
        import mlflow  # in the replica's process

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.served = self.model.unwrap_python_model()  # request checks and decoding only
        self.schema = self.model.metadata.get_input_schema()
        self.cfg = self.served.config
        self.base = Path(mlflow.artifacts.download_artifacts(artifact_uri=self.cfg["base_uri"]))
        self.loads = 0

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, task: str):
        self.loads += 1
        rc = load_backbone(self.cfg["arch"], self.base / "pretrain", self.base / "mimic").recast()
        # the task's tensors as the served version loaded them (its packs, already in this replica:
        # no download per model load, so multiplexing pays only for building a model per task id)
        own = self.served.rc.task_tensors(task)
        rc.load_task_tensors(task, own, num_classes=self.served.rc.num_classes(task))
        rc.set_task(task)
        return rc.eval()

    @serve.batch(max_batch_size=512, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(len(t) for t, _ in items))
    async def forward(self, items):
        rc = await self.get_model(serve.get_multiplexed_model_id())  # Serve batches one model id at a time
        x = torch.cat([rows for _, rows in items])
        with torch.no_grad():
            logits = rc(x)
        return list(torch.split(logits, [len(t) for t, _ in items]))

    async def __call__(self, request: Request) -> Response:
        import io

        from mlflow.pyfunc.scoring_server import infer_and_parse_data, predictions_to_json

        frame = infer_and_parse_data(json.loads(await request.body()), self.schema)
        tasks, x = self.served.prepare(frame)
        if set(tasks) != {serve.get_multiplexed_model_id()}:
            return Response("one task per request, named by the serve_multiplexed_model_id header", status_code=400)
        logits = await self.forward((tasks, x))
        buf = io.StringIO()
        predictions_to_json(self.served.answer(logits, tasks), buf)
        return Response(buf.getvalue(), media_type="application/json", headers={"x-model-loads": str(self.loads)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zipf_tasks(n_tasks: int, count: int, rng: np.random.Generator, s: float = 1.1) -> list[int]:
    """``count`` task indices drawn with P(rank k) proportional to 1 / k^s over ``n_tasks`` tasks."""
    weights = 1.0 / np.arange(1, n_tasks + 1) ** s
    return rng.choice(n_tasks, size=count, p=weights / weights.sum()).tolist()


def post(url: str, body: bytes, task: str) -> tuple[int, dict, float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", MODEL_ID_HEADER: task})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            out = json.loads(resp.read())
            return resp.status, out, time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read()[:300].decode(errors="replace")}, time.perf_counter() - start


def run_load(url: str, work: list[list[tuple[str, bytes]]]) -> tuple[float, dict]:
    """All clients at once, each its requests in turn: (wall seconds, {(c, r): (status, answer, latency)})."""
    got: dict = {}

    def client(c: int) -> None:
        for r, (task, body) in enumerate(work[c]):
            got[c, r] = post(url, body, task)

    return released_together([lambda c=c: client(c) for c in range(len(work))]), got


def summarise(seconds: float, got: dict, want: dict) -> dict:
    errors = wrong = rows = 0
    for key, (status, out, _) in got.items():
        if status != 200:
            errors += 1
            continue
        expect = want[key]
        for row, cls, probs in zip(out["predictions"], expect["class"], expect["probabilities"]):
            rows += 1
            wrong += (row["class"] != cls or float(np.abs(np.subtract(row["probabilities"], probs)).max()) > 1e-5)
    lat = np.array([v[2] for v in got.values()]) * 1000
    return {"requests": len(got), "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "errors": errors, "wrong_rows": wrong}


def summarise_repeats(measured: list[tuple[float, dict]], want: dict) -> dict:
    """Repeats of one server: median rows/s (and each repeat's), latency percentiles over all requests."""
    each = [summarise(seconds, got, want) for seconds, got in measured]
    lat = np.array([v[2] for _, got in measured for v in got.values()]) * 1000
    return {"requests": sum(e["requests"] for e in each), "rows": sum(e["rows"] for e in each),
            "rows_per_s": float(np.median([e["rows_per_s"] for e in each])),
            "rows_per_s_repeats": [e["rows_per_s"] for e in each],
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "errors": sum(e["errors"] for e in each), "wrong_rows": sum(e["wrong_rows"] for e in each)}


def mlflow_server(model_uri: str, tracking: str, root: Path):
    """``mlflow models serve`` on 127.0.0.1 (one worker): (URL, process)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    log = open(root / f"mlflow-serve.{port}.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return f"http://127.0.0.1:{port}/invocations", proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / f"mlflow-serve.{port}.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    raise TimeoutError("mlflow models serve did not start")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def expected(model, work: list[list[tuple[str, bytes]]]) -> dict:
    return {(c, r): model.predict(pd.DataFrame(json.loads(body)["dataframe_records"]))
            for c, reqs in enumerate(work) for r, (_, body) in enumerate(reqs)}
