"""The served model under load through the real ``mlflow models serve --env-manager local``.

Builds, in a temporary sqlite store, the served model of the default pipeline's ViT (``test_vit``
at 32 px as params.yaml's ``pretrain.archs.vit`` names it; random weights, banks from
``recast.apply``, two tasks with random payloads of 5 and 10 classes and prepared tasks for
their transforms: the compute of the default suite's served model, not its accuracy), serves it
on 127.0.0.1 and sends requests of ``--rows`` rows of both tasks, each image a base64 PNG of
random 32 x 32 pixels. First one client, then ``--clients`` clients at once, each sending
``--requests`` requests one after another. Every answer is compared with the sequential
``mlflow.pyfunc.load_model(...).predict`` of the same rows (wrong = another class, or a
probability off by more than 1e-5).

    python -m benchmarks.bench_serving [--clients 8] [--requests 20] [--rows 8] [--workers 1]

Prints a Markdown table; writes ``benchmarks/results/bench_serving.json`` (with ``uptime`` before
and after and ``environment()``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import yaml
from PIL import Image

import recast

# isort: split
from benchmarks.concurrent import released_together  # noqa: E402
from benchmarks.environment import environment
from recast.data import AugmentPolicy
from recast.data.storage import TaskWriter, write_task_arrays
from recast.io import save_payload
from stages.config.common import REPO_ROOT
from stages.config.params import MimicArch
from stages.jobs.backbones import load_backbone, save_mimicked, save_pretrained

TASKS = {"t5": 5, "t10": 10}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build_store(root: Path, tasks: dict[str, int] = TASKS, build_model: bool = True) -> str:
    """A served model of the default ViT with random-payload ``tasks`` (name: classes), prepared
    tasks for their transforms; built unless ``build_model`` is False. Returns the tracking URI."""
    from stages.serving.build import build
    from stages.tracking.payloads import register_payload
    from stages.tracking.store import artifact_location, make_client

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    arch = params["pretrain"]["archs"]["vit"]
    torch.manual_seed(0)
    model = timm.create_model(arch["model"], pretrained=False, num_classes=10, **arch["kwargs"]).eval()
    save_pretrained(root / "pretrain", "vit", model.state_dict(),
                    {"model": arch["model"], "kwargs": arch["kwargs"], "num_classes": 10, "source": "train"})
    cfg = MimicArch(**params["mimic"]["archs"]["vit"]).recast_config()
    rc = recast.apply(model, cfg, seed=0)
    save_mimicked(root / "mimic", "vit", cfg, 0, {k: b.templates.detach() for k, b in rc.banks.items()},
                  rc.task_tensors(cfg.base_task))
    rc = load_backbone("vit", root / "pretrain", root / "mimic").recast()
    client = make_client()
    exp = client.create_experiment("payloads", artifact_location=artifact_location(client.tracking_uri))
    rng = np.random.default_rng(0)
    for i, (task, n) in enumerate(tasks.items()):
        rc.add_task(task, num_classes=n)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in rc.task_parameters(task):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        save_payload(rc, task, root / "payloads" / task / f"{task}-s42")
        rid = client.create_run(exp).info.run_id
        client.log_artifacts(rid, str(root / "payloads" / task), "payload")
        client.set_terminated(rid)
        register_payload(rid, "vit", task, "recast", tags={})
        splits = {s: (rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8), np.arange(16) % n, [""] * 16)
                  for s in ("train", "val", "test")}
        with TaskWriter(root / "prepared", task, [str(c) for c in range(n)], 32, description="bench",
                        augment=AugmentPolicy(), origin="bench", seed=0, val_fraction=0.1) as writer:
            write_task_arrays(writer, splits)
    if build_model:
        build("vit", "recast", root / "pretrain", root / "mimic", 32, tasks=list(tasks), data_dir=root / "prepared")
    return os.environ["MLFLOW_TRACKING_URI"]


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bodies(clients: int, requests: int, rows: int, seed: int = 0) -> list[list[bytes]]:
    rng = np.random.default_rng(seed)
    names = list(TASKS)
    return [[json.dumps({"dataframe_records": [
        {"task": names[(c + r + i) % len(names)], "image": _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))}
        for i in range(rows)]}).encode() for r in range(requests)] for c in range(clients)]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def run_clients(url: str, work: list[list[bytes]]) -> tuple[float, dict]:
    """Every client sends its requests one after another, all clients at once: (seconds, answers)."""
    got: dict = {}

    def client(c: int) -> None:
        for r, body in enumerate(work[c]):
            got[c, r] = _post(url, body)

    return released_together([lambda c=c: client(c) for c in range(len(work))]), got


def score(got: dict, want: dict) -> tuple[int, int, int]:
    """(errors, wrong rows, rows) of the answers against the sequential predictions."""
    errors = wrong = total = 0
    for key, (status, out) in got.items():
        if status != 200:
            errors += 1
            continue
        for row, cls, probs in zip(out["predictions"], want[key]["class"], want[key]["probabilities"]):
            total += 1
            wrong += (row["class"] != cls or len(row["probabilities"]) != len(probs)
                      or float(np.abs(np.subtract(row["probabilities"], probs)).max()) > 1e-5)
    return errors, wrong, total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--rows", type=int, default=8, help="rows per request")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers of mlflow models serve (-w)")
    ap.add_argument("--json-out", default=None, help="default: benchmarks/results/bench_serving[_compare].json")
    ap.add_argument("--compare", action="store_true", help="issue 31: mlflow serve vs Ray Serve cross-task vs "
                    "Ray Serve multiplexing at --task-counts, Zipf(1.1) task popularity (benchmarks/serving_compare.py)")
    ap.add_argument("--task-counts", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=3, help="--compare: interleaved repeats per server (median rows/s)")
    args = ap.parse_args(argv)
    name = "bench_serving_compare.json" if args.compare else "bench_serving.json"
    args.json_out = args.json_out or str(REPO_ROOT / "benchmarks" / "results" / name)
    if args.compare:
        return compare(args)
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        uri = build_store(root)
        model = mlflow.pyfunc.load_model("models:/recast-serve.vit.recast@current")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/recast-serve.vit.recast@current",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(args.workers)]
        with open(root / "serve.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for _ in range(480):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                        break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError((root / "serve.log").read_text()[-3000:]) from None
                    time.sleep(0.5)
            url = f"http://127.0.0.1:{port}/invocations"
            work = bodies(args.clients, args.requests, args.rows)
            want = {(c, r): model.predict(pd.DataFrame(json.loads(b)["dataframe_records"]))
                    for c, reqs in enumerate(work) for r, b in enumerate(reqs)}
            _post(url, work[0][0])  # warm-up
            results = {"args": vars(args), "environment": environment(), "runs": []}
            for n in (1, args.clients):
                load_before = _uptime()
                seconds, got = run_clients(url, work[:n])
                errors, wrong, total = score(got, want)
                results["runs"].append({"clients": n, "requests": len(got), "rows": total, "seconds": round(seconds, 3),
                                        "requests_per_s": round(len(got) / seconds, 2),
                                        "rows_per_s": round(total / seconds, 1), "errors": errors, "wrong_rows": wrong,
                                        "uptime_before": load_before, "uptime_after": _uptime()})
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    one, many = results["runs"]
    results["speedup_requests_per_s"] = round(many["requests_per_s"] / one["requests_per_s"], 2)
    print("| clients | requests | rows | s | requests/s | rows/s | errors | wrong rows | uptime before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['clients']} | {r['requests']} | {r['rows']} | {r['seconds']} | {r['requests_per_s']} | "
              f"{r['rows_per_s']} | {r['errors']} | {r['wrong_rows']} | {r['uptime_before']} |")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def compare(args) -> dict:
    """Issue 31, item 2: rows/s and p50/p99 of (a) mlflow serve, (b) Ray Serve cross-task, (c) Ray
    Serve multiplexing, at each T of ``--task-counts``; each T's servers measured back to back."""
    import mlflow
    import ray
    from ray import serve

    from benchmarks import serving_compare as sc
    from stages.serving.build import build
    from stages.serving.ray_app import RayServeArgs, RecastServe

    counts = [int(t) for t in args.task_counts.split(",")]
    results = {"args": vars(args), "environment": environment(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{root / 'mlflow.db'}"
        names = [f"t{i}" for i in range(max(counts))]
        build_store(root, {t: 10 for t in names}, build_model=False)
        # 4 logical CPUs: each app's replica gets 2 (torch then runs 2 threads, as in mlflow serve)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri}})
        port = sc.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_base = f"http://127.0.0.1:{port}"
        rng = np.random.default_rng(0)
        try:
            for n_tasks in counts:
                out = build("vit", "recast", root / "pretrain", root / "mimic", 32, tasks=names[:n_tasks],
                            data_dir=root / "prepared")
                model_uri = f"models:/recast-serve.vit.recast/{out['version']}"
                model = mlflow.pyfunc.load_model(model_uri)
                picks = sc.zipf_tasks(n_tasks, args.clients * args.requests, rng)
                work = [[(names[picks[c * args.requests + r]], json.dumps({"dataframe_records": [
                    {"task": names[picks[c * args.requests + r]],
                     "image": _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))} for _ in range(args.rows)]}).encode())
                    for r in range(args.requests)] for c in range(args.clients)]
                want = sc.expected(model, work)
                warm = [reqs[:1] for reqs in work]
                row = {"tasks": n_tasks, "distinct_tasks_sent": len(set(picks)), "uptime_before": _uptime()}
                url, proc = sc.mlflow_server(model_uri, uri, root)
                try:
                    cross = RecastServe.options(ray_actor_options={"num_cpus": 2}).bind(
                        RayServeArgs(model_uri=model_uri, tracking_uri=uri).model_dump())
                    multi = sc.RecastMultiplexed.options(ray_actor_options={"num_cpus": 2}).bind(model_uri, uri)
                    serve.run(cross, name="cross", route_prefix="/cross")
                    serve.run(multi, name="multiplexed", route_prefix="/multiplexed")
                    urls = {"mlflow": url, "ray_cross_task": f"{ray_base}/cross/invocations",
                            "ray_multiplexed": f"{ray_base}/multiplexed/invocations"}
                    for server_url in urls.values():
                        sc.run_load(server_url, warm)  # warm-up: one request per client, all at once
                    runs = {k: [] for k in urls}
                    for _ in range(args.repeats):  # interleaved: a load swing hits every server alike
                        for key, server_url in urls.items():
                            runs[key].append(sc.run_load(server_url, work))
                    for key, measured in runs.items():
                        row[key] = sc.summarise_repeats(measured, want)
                finally:
                    sc.stop(proc)
                    for app_name in ("cross", "multiplexed"):
                        serve.delete(app_name)
                row["uptime_after"] = _uptime()
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    by_t = {r["tasks"]: r for r in results["runs"]}
    print("| T | server | rows/s (median) | rows/s (all repeats) | p50 ms | p99 ms | errors | wrong rows | load before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        for key in ("mlflow", "ray_cross_task", "ray_multiplexed"):
            m = r[key]
            print(f"| {r['tasks']} | {key} | {m['rows_per_s']} | {m['rows_per_s_repeats']} | {m['p50_ms']} | {m['p99_ms']} | {m['errors']} | "
                  f"{m['wrong_rows']} | {r['uptime_before'].split('load average: ')[-1]} |")
    failed = [f"T={r['tasks']} {key}: {r[key]['errors']} errors, {r[key]['wrong_rows']} wrong rows"
              for r in results["runs"] for key in ("mlflow", "ray_cross_task", "ray_multiplexed")
              if r[key]["errors"] or r[key]["wrong_rows"]]
    if failed:  # no ratio of a server that did not answer right
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
        raise SystemExit("bench_serving --compare: " + "; ".join(failed))
    if max(counts) in by_t:
        top = by_t[max(counts)]
        results["ratios"] = {"cross_vs_multiplexed": round(top["ray_cross_task"]["rows_per_s"] / top["ray_multiplexed"]["rows_per_s"], 2),
                             "cross_vs_mlflow": round(top["ray_cross_task"]["rows_per_s"] / top["mlflow"]["rows_per_s"], 2)}
        if min(counts) in by_t:
            results["ratios"]["cross_top_vs_cross_T1"] = round(
                top["ray_cross_task"]["rows_per_s"] / by_t[min(counts)]["ray_cross_task"]["rows_per_s"], 2)
        print(results["ratios"])
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
