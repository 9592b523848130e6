"""Jobs need nothing from the driver's filesystem: ``tune``, ``combine`` and a sweep on a real
two-node Ray cluster whose only worker node cannot see the project's data or stage outputs.

The head node has no CPUs, so every job runs on the worker node. That node is started in its own
mount namespace (``unshare --mount``) with an empty tmpfs over the ``data/`` and ``outputs/``
of both the stage outputs' root and the driver's project copy. Inputs reach the jobs through
Ray's object store, code through ``runtime_env.working_dir``. The metrics and payloads must
equal those of the same jobs run in this process from the files (a single-node run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_sweep_cluster import exports_of, run_script

from helpers import cmdline, free_port, session_pids
from pipelines.config import load_config
from pipelines.specs import build_specs
from pipelines.trials import run_trial
from stages.config.params import CombineParams, TuneParams
from stages.jobs.inputs import InputStore
from stages.jobs.sequential import continual_specs
from stages.jobs.specs import method_specs
from stages.jobs.train import dispatch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
TRAIN = {"epochs": 1, "lr": 0.01, "step_size": 10, "batch_size": 32, "limit_train": 32, "limit_eval": 32}
TASK = "mnist_lo5"
COMPARED = ("val_acc", "test_acc", "best_epoch", "trainable_params", "stored_params", "bytes", "steps")


def mount_namespaces_work() -> str:
    """'' when ``unshare --mount`` can mount a tmpfs here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare executable"
    probe = tempfile.mkdtemp()
    try:
        proc = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs none {probe}"],
                              capture_output=True, text=True, check=False)
    finally:
        os.rmdir(probe)
    return "" if proc.returncode == 0 else f"unshare --mount fails here: {proc.stderr.strip()}"


def params_for(stage_root: Path, tmp: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["runtime"].update(num_cpus=1, cpus_per_task=1, progress=False, experiment="cluster-inputs",
                             cache_dir=str(tmp / "cache"), max_retries=0)
    params["tune"].update(archs=["vit"], tasks=[TASK], train=TRAIN, data_dir=str(stage_root / "data/prepared/offline"),
                          pretrain_dir=str(stage_root / "outputs/pretrain"), mimic_dir=str(stage_root / "outputs/mimic"),
                          methods={"head_only": {"kind": "head_only"}, "recast": {"kind": "recast"}},
                          continual={"methods": {"vit": ["ewc"]}})  # trains with TRAIN (equal budget)
    params["combine"]["methods"] = {"adaptformer_recast": params["combine"]["methods"]["adaptformer_recast"]}
    lrs = params["tune"]["lr_by_method"]  # the lr table of the arch that runs
    lrs.update(archs={"vit": lrs["archs"]["vit"]}, source={"vit": lrs["source"]["vit"]})
    params["pretrain"]["archs"] = {"vit": params["pretrain"]["archs"]["vit"]}
    params["mimic"]["archs"] = {"vit": {**params["mimic"]["archs"]["vit"], "ablations": {}}}
    params["evaluate"]["forgetting_archs"] = ["vit"]
    return params


@pytest.fixture
def cluster(stage_root: Path, tmp_path: Path, source_tree):
    """A head (0 CPUs) and a worker node (1 CPU) that sees no ``data/`` or ``outputs/``."""
    reason = mount_namespaces_work()
    if reason:
        pytest.skip(reason)
    project = source_tree(tmp_path / "project")
    hidden = [d for root in {stage_root, project} for d in (root / "data", root / "outputs")]
    for d in hidden:
        d.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RECAST_PARAMS")}
    env.update(PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1")
    ray_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray puts unix sockets under it
    try:
        out = run_script(INFRA / "ray/start_local.sh", "-p", str(free_port()), "-c", "0", "-t", str(ray_dir),
                         env=env, timeout=150)
        env.update(exports_of(out))
        mounts = " && ".join(f"mount -t tmpfs none {d}" for d in hidden)
        ray_bin = Path(sys.executable).parent / "ray"
        start = (f"{mounts} && exec {ray_bin} start --address={env['RAY_ADDRESS']} --num-cpus=1 --num-gpus=0 "
                 f"--node-ip-address=127.0.0.1 --disable-usage-stats --temp-dir={ray_dir} "
                 f"--dashboard-agent-listen-port=0")
        worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", start], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True, text=True)
        (ray_dir / "recast-worker.pid").write_text(f"{worker.pid}\n")  # its session: stop_local.sh stops it
        log = worker.communicate(timeout=150)[0]
        assert worker.returncode == 0, log
        raylet = next(pid for pid in session_pids(worker.pid) if "raylet" in cmdline(pid))
        seen = subprocess.run(["nsenter", "--target", str(raylet), "--mount", "ls", "-A", *map(str, hidden)],
                              capture_output=True, text=True, check=True).stdout
        assert not [ln for ln in seen.splitlines() if ln and not ln.endswith(":")], seen  # the worker sees nothing
        assert any((stage_root / "outputs").iterdir())  # while the driver sees the stage outputs
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        yield {"env": env, "project": project, "raylet_pid": raylet}
    finally:
        if (ray_dir / "recast-head.pid").exists():
            run_script(INFRA / "ray/stop_local.sh", "-t", str(ray_dir), env=env, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)


def drive(module: str, args: list[str], cluster: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cluster["project"], env=cluster["env"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def worker_node_id(cluster: dict) -> str:
    """The Ray node id of the worker node (the one with CPUs)."""
    script = ("import json, ray; ray.init(log_to_driver=False); "
              "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]))")
    out = subprocess.run([sys.executable, "-c", script], env=cluster["env"], capture_output=True, text=True,
                         timeout=120, check=True, cwd=cluster["project"]).stdout
    (node,) = json.loads(out.strip().splitlines()[-1])
    return node


def test_tune_combine_and_a_sweep_run_on_a_node_without_the_files(cluster, stage_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)  # as each Ray job (cpus_per_task: 1): the same arithmetic
    project = cluster["project"]
    params = params_for(stage_root, tmp_path)
    (project / "cluster.yaml").write_text(yaml.safe_dump(params))
    sweep_cfg = tmp_path / "seeds.yaml"
    sweep_cfg.write_text(yaml.safe_dump({
        "arch": "vit", "tasks": [TASK], "seeds": [42], "methods": {"recast": {"kind": "recast"}}, "train": TRAIN,
        "data_dir": str(stage_root / "data/prepared/offline"), "pretrain_dir": str(stage_root / "outputs/pretrain"),
        "mimic_dir": str(stage_root / "outputs/mimic"), "out_dir": str(tmp_path / "sweeps"),
        "runtime": {"cache_dir": str(tmp_path / "cache"), "experiment": "cluster-inputs", "progress": False,
                    "max_retries": 0}}))
    drive("stages.tune", ["--params", "cluster.yaml"], cluster)
    drive("stages.combine", ["--params", "cluster.yaml"], cluster)
    drive("pipelines.sweep", ["--sweep", "seeds", "--config", str(sweep_cfg), "--params", "cluster.yaml"], cluster)
    node = worker_node_id(cluster)

    # the same jobs, in this process, reading the files (a single-node run)
    tune, combine = TuneParams(**params["tune"]), CombineParams(**params["combine"])
    store = InputStore()
    specs = {"tune": method_specs("tune", tune, tune.methods, "cpu", store) + continual_specs("tune", tune, "cpu", store),
             "combine": method_specs("combine", tune, combine.methods, "cpu", store)}
    for stage, out_dir in (("tune", tune.out_dir), ("combine", combine.out_dir)):
        rows = json.loads((project / out_dir / "results.json").read_text())
        assert len(rows) == len(specs[stage]) and {r["ray_node"] for r in rows} == {node}
        by_id = {(r["method"], r.get("task", "sequential")): r for r in rows}
        for spec in specs[stage]:
            result = dispatch(spec, store.local(spec["inputs"]))
            meta, payload = result.metrics, result.tensors
            row = by_id[(spec["method_name"], spec.get("task", "sequential"))]
            if spec.get("kind") == "continual":
                assert (row["final_acc"], row["acc_matrix"]) == (meta["final_acc"], meta["acc_matrix"])
                continue
            assert {k: row[k] for k in COMPARED} == {k: meta[k] for k in COMPARED}, spec["id"]
            stored = load_file(project / out_dir / "payloads/vit" / spec["method_name"] / f"{TASK}-s42.safetensors")
            assert stored.keys() == payload.keys() and all(torch.equal(stored[k], payload[k]) for k in payload)

    table = pq.read_table(tmp_path / "sweeps/seeds/results.parquet").to_pylist()
    sweep_store = InputStore()
    (spec,) = build_specs("seeds", load_config("seeds", sweep_cfg), "cpu", sweep_store)
    meta = run_trial(spec, sweep_store.local(spec["inputs"]))
    assert len(table) == 1 and table[0]["id"] == spec["id"]
    assert (table[0]["test_acc"], table[0]["val_acc"]) == (meta["test_acc"], meta["val_acc"])
    assert table[0]["ray_node"] == node  # the trial ran on the worker node
